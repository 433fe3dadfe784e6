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
