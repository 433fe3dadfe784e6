"""Shared fixtures: paths to the SPM12 reference cases and the real ds005917 metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

#: SPM12's own numbers (copied from the project's shared folder; README.md there says how they were made).
SPM_REFERENCE = Path(__file__).resolve().parent / "data" / "spm-reference"
#: The real ds005917 metadata and MADRS phenotype, as bundled with the package (CC0).
DS005917 = Path(__file__).resolve().parents[1] / "bids_ketdcm" / "data" / "ds005917"

torch.set_num_threads(2)


def load_spm_csd(path: Path, n: int) -> np.ndarray:
    """Read SPM's CSD text format (rows: frequency, i, j, real, imag; 1-based)."""
    rows = np.loadtxt(path)
    out = np.zeros((int(rows[:, 0].max()), n, n), dtype=complex)
    idx = rows[:, :3].astype(int) - 1
    out[idx[:, 0], idx[:, 1], idx[:, 2]] = rows[:, 3] + 1j * rows[:, 4]
    return out


class SpmCase:
    """One SPM12 reference case (DESIGN.md section 7, 'Reference files')."""

    def __init__(self, name: str):
        self.name = name
        self.path = SPM_REFERENCE / name
        self.n = int(name[1:3])
        self.ts = np.loadtxt(self.path / "ts.txt")
        self.freqs = np.loadtxt(self.path / "Hz.txt")

    def has(self, filename: str) -> bool:
        return (self.path / filename).exists()

    def csd(self, filename: str = "csd_data.txt") -> np.ndarray:
        return load_spm_csd(self.path / filename, self.n)

    def array(self, filename: str) -> np.ndarray:
        return np.loadtxt(self.path / filename)

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())


def spm_cases() -> list[str]:
    """Names of the SPM12 reference cases; an empty list would parametrise to nothing, so fail loudly."""
    cases = sorted(p.name for p in SPM_REFERENCE.iterdir() if p.is_dir())
    if not cases:
        raise RuntimeError(f"no SPM reference cases under {SPM_REFERENCE}")
    return cases


@pytest.fixture(scope="session")
def spm_case_factory():
    return SpmCase
