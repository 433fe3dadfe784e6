"""Shared fixtures: paths to the SPM12 reference cases and the real ds005917 metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bids_ketdcm.threads import limit_threads

#: SPM12's own numbers (copied from the project's shared folder; README.md there says how they were made).
SPM_REFERENCE = Path(__file__).resolve().parent / "data" / "spm-reference"
#: The real ds005917 metadata and MADRS phenotype, as bundled with the package (CC0).
DS005917 = Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "ds005917"

#: One torch and one BLAS thread per test process, the app's own policy (bids_ketdcm.threads):
#: pytest -n 2 runs two processes on 2 cores, and two threads each made DCM fits up to 60x
#: slower; and the features computed outside ``fit`` are then the app's to the last bit
#: (2 BLAS threads moved them by 3e-15, and an 11-region exact path's end by 0.08 nats).
limit_threads(1)


def load_spm_csd(path: Path, n: int) -> np.ndarray:
    """Read SPM's CSD text format (rows: frequency, i, j, real, imag; 1-based)."""
    rows = np.loadtxt(path)
    out = np.zeros((int(rows[:, 0].max()), n, n), dtype=complex)
    idx = rows[:, :3].astype(int) - 1
    out[idx[:, 0], idx[:, 1], idx[:, 2]] = rows[:, 3] + 1j * rows[:, 4]
    return out


#: SPM's iteration counts of the simulated cases (tests/data/spm-reference/README.md); the
#: real cases record theirs in meta.json.
SIMULATED_SPM_ITERATIONS = {"n04_seed1": 44, "n04_seed2": 24, "n11_seed1": 60}


class SpmCase:
    """One SPM12 reference case (DESIGN.md section 7, 'Reference files')."""

    def __init__(self, name: str):
        self.name = name
        self.path = SPM_REFERENCE / name
        self.ts = np.loadtxt(self.path / "ts.txt")
        self.n = self.ts.shape[1]
        self.freqs = np.loadtxt(self.path / "Hz.txt") if self.has("Hz.txt") else None
        #: repetition time: written by scripts/spm/make_real_cases.py for the real cases, 2.5 s otherwise
        self.tr = float(self.text("source.txt").split()[1]) if self.has("source.txt") else 2.5

    def has(self, filename: str) -> bool:
        return (self.path / filename).exists()

    def csd(self, filename: str = "csd_data.txt") -> np.ndarray:
        return load_spm_csd(self.path / filename, self.n)

    def array(self, filename: str) -> np.ndarray:
        return np.loadtxt(self.path / filename)

    def text(self, filename: str) -> str:
        return (self.path / filename).read_text()

    @property
    def spm_basis(self) -> np.ndarray | None:
        """SPM's basis of the reduced parameter space, recorded above 8 regions by scripts/spm."""
        return np.load(self.path / "spm_basis.npz")["basis"] if self.has("spm_basis.npz") else None

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    @property
    def spm_iterations(self) -> int | None:
        """SPM12's Gauss-Newton iterations on this case (meta.json, else the simulated cases' record)."""
        return self.meta.get("iterations", SIMULATED_SPM_ITERATIONS.get(self.name))


def spm_cases(real: bool = False) -> list[str]:
    """Names of the simulated (or, with ``real``, the real-data) SPM12 reference cases.

    An empty list would parametrise to nothing, so fail loudly.
    """
    cases = sorted(p.name for p in SPM_REFERENCE.iterdir() if p.is_dir() and (p / "source.txt").exists() == real)
    if not cases:
        raise RuntimeError(f"no SPM reference cases under {SPM_REFERENCE}")
    return cases


def inverted_spm_cases() -> list[str]:
    """Every reference case, simulated or real, with SPM12's full inversion (meta.json with F)."""
    return [c for c in spm_cases() + spm_cases(real=True) if (SPM_REFERENCE / c / "meta.json").exists()]


@pytest.fixture(scope="session")
def spm_case_factory():
    return SpmCase


# --------------------------------------------------------------------------- tiny fMRIPrep layouts

#: Func file lists of the official BIDS examples (bids-standard/bids-examples at the commit in COMMIT).
BIDS_EXAMPLES = Path(__file__).resolve().parent / "data" / "bids_examples"
SPACE = "MNI152NLin2009cAsym"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """One small synthetic fMRIPrep run (100 volumes, TR 2.5 s, 4 planted DMN regions): its files by role."""
    from bids_ketdcm.testing.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "bids", n_subjects=1, n_scans=100, seed=7)
    func = next((root / "derivatives" / "fmriprep").glob("sub-*/ses-*/func"))
    stem = next(func.glob("*_run-01_*desc-preproc_bold.nii.gz")).name.split("_space-")[0]
    return {
        "bold": func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz",
        "bold_json": func / f"{stem}_space-{SPACE}_desc-preproc_bold.json",
        "mask": func / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz",
        "confounds": func / f"{stem}_desc-confounds_timeseries.tsv",
        "confounds_json": func / f"{stem}_desc-confounds_timeseries.json",
    }


def fmriprep_layout(root: Path, names: list[str], template: dict[str, Path], *, raw: bool = False,
                    confounds_suffix: str = "desc-confounds_timeseries") -> Path:
    """An fMRIPrep dataset at ``root`` with these func file names, filled from ``template``.

    ``raw``: the names are raw BOLD files (``*_bold.nii[.gz]``): each becomes the fMRIPrep
    outputs of that run in MNI152NLin2009cAsym (BOLD, mask, confounds). Otherwise the names
    are fMRIPrep outputs: preprocessed BOLD, masks and confounds are linked to the template's
    files, every other file is left empty (never opened).
    """
    import os

    def put(dst: Path, src: Path | None) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src is None:
            dst.write_text("{}" if dst.suffix == ".json" else "")
        elif dst.name.endswith(".nii") and src.name.endswith(".nii.gz"):
            import nibabel as nib

            plain = src.with_name(src.name[:-3])  # uncompressed once, linked everywhere
            if not plain.exists():
                nib.save(nib.load(src), plain)
            os.link(plain, dst)
        else:
            os.link(src, dst)

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.1.0"}]}))
    for name in names:
        path = root / name
        if raw:
            if not name.endswith(("_bold.nii.gz", "_bold.nii")):
                continue
            stem = path.name.split("_bold.nii")[0]
            for suffix, role in ((f"_space-{SPACE}_desc-preproc_bold.nii.gz", "bold"),
                                 (f"_space-{SPACE}_desc-preproc_bold.json", "bold_json"),
                                 (f"_space-{SPACE}_desc-brain_mask.nii.gz", "mask"),
                                 (f"_{confounds_suffix}.tsv", "confounds"),
                                 (f"_{confounds_suffix}.json", "confounds_json")):
                put(path.with_name(stem + suffix), template[role])
            continue
        if f"space-{SPACE}" in name and "desc-preproc_bold.nii" in name:
            put(path, template["bold"])
        elif f"space-{SPACE}" in name and "desc-preproc_bold.json" in name:
            put(path, template["bold_json"])
        elif f"space-{SPACE}" in name and "brain_mask.nii" in name:
            put(path, template["mask"])
        elif "desc-confounds_" in name and name.endswith(".tsv"):
            put(path, template["confounds"])
        elif "desc-confounds_" in name and name.endswith(".json"):
            put(path, template["confounds_json"])
        else:
            put(path, None)
    return root


def example_names(example: str) -> list[str]:
    """The func file names of one BIDS example."""
    return (BIDS_EXAMPLES / f"{example}.txt").read_text().split()


#: Opens an atomic write of the path in argv[1] and dies before finishing it (as kill -9 would).
_DIE_MID_WRITE = ("import os, sys\nfrom bids_ketdcm.io import atomic_path\n"
                  "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_text('half')\n    os._exit(0)\n")


def killed_writer(path: Path) -> Path:
    """The temporary file a real process left when it died writing ``path``."""
    subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(path)], check=True)
    [tmp] = path.parent.glob(f".{path.name}.*.tmp")
    return tmp
