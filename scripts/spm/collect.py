"""Copy the numbers of finished SPM runs (scripts/spm/run_all.sh) into the test data.

Usage: ``python scripts/spm/collect.py RUN_DIR TEST_DATA_DIR``: every case folder of RUN_DIR
with a meta.json is copied (time series, SPM's numbers and features; SPM's basis of the
reduced parameter space as compressed .npz above 8 regions, where it is not the identity).
Folders with only SPM's features (``SPM_FEATURES_ONLY=1 run_all.sh``) give their
``csd_data.txt`` and ``Hz.txt`` to the case of the same name.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

FILES = ("ts.txt", "source.txt", "meta.json", "spm_Ep_A.txt", "spm_Vp_A.txt", "Ep_vec.txt")
FEATURES = ("csd_data.txt", "Hz.txt")


def main(run_dir: Path, out_dir: Path) -> None:
    for case in sorted(p.parent for p in run_dir.glob("*/meta.json")):
        target = out_dir / case.name
        target.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(case / name, target / name)
        if json.loads((case / "meta.json").read_text())["n"] > 8:
            np.savez_compressed(target / "spm_basis.npz", basis=np.loadtxt(case / "spm_basis.txt"))
        print(case.name, file=sys.stderr)
    for case in sorted(p.parent for p in run_dir.glob("*/csd_data.txt")):
        for name in FEATURES:
            shutil.copyfile(case / name, out_dir / case.name / name)
        print(case.name, "features", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
