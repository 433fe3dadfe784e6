"""Speed of the structural features per participant; prints one JSON line.

One participant with fMRIPrep-shaped probability maps on nilearn's bundled 1 mm MNI152
template grid (GM and WM from its templates, CSF = brain - GM - WM), a
Jacobian map (modulation on), and the default region sets: dmn4 + the power264 whole-brain
atlas. Times :func:`bids_ketdcm.participant.structural.run_structural` from file discovery to the
written tables. Target: <= 10 s per participant on 2 cores.

Usage: python benchmarks/structural_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

SPACE = "MNI152NLin2009cAsym"


def write_participant(root: Path, subject: str) -> None:
    """fMRIPrep-shaped anat folder of one participant on the 1 mm template grid."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template

    gm = load_mni152_gm_template(resolution=1)
    wm = np.asarray(load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    brain = np.asarray(load_mni152_brain_mask(resolution=1).dataobj, dtype=np.float32)
    g = np.asarray(gm.dataobj, dtype=np.float32)
    total = np.maximum(g + wm, 1.0)
    g, wm = g / total, wm / total
    csf = np.clip(brain - g - wm, 0.0, 1.0)
    folder = root / f"sub-{subject}" / "anat"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "benchmark", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    for tissue, data in (("GM", g), ("WM", wm), ("CSF", csf)):
        name = f"sub-{subject}_space-{SPACE}_label-{tissue}_probseg.nii.gz"
        nib.save(nib.Nifti1Image(data, gm.affine), folder / name)
    jac = np.random.default_rng(0).uniform(0.9, 1.1, g.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(jac, gm.affine), folder / f"sub-{subject}_space-{SPACE}_desc-jacobian_map.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from bids_ketdcm.participant.structural import run_structural

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_participant(tmp / "fmriprep", "01")
        seconds = []
        for k in range(args.repeats):
            start = time.perf_counter()
            run_structural(tmp / "fmriprep", tmp / f"out{k}", ["01"], "b0", SPACE,
                           ["dmn4", "power264"])
            seconds.append(time.perf_counter() - start)
        meta = json.loads(next((tmp / "out0").rglob("*seg-dmn4_desc-gmv_morph.json")).read_text())
        shape = nib.load(meta["Sources"][0]).shape
    print(json.dumps({"grid_shape_1mm": list(shape), "regions": 4 + 264, "modulated": True,
                      "seconds_per_participant": [round(s, 2) for s in seconds],
                      "median_s": round(float(np.median(seconds)), 2), "target_s": 10,
                      "TIV_mm3": round(meta["TIV_mm3"])}))


if __name__ == "__main__":
    main()
