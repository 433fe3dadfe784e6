"""Temporary files of atomic writes killed mid-write: removed once their writer is gone, never
while a concurrent job still writes them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import killed_writer

from bids_ketdcm.io import _HOST, STALE_TEMPORARY_S, atomic_path, remove_stale_temporaries


def _aged(path: Path, seconds: float) -> Path:
    if not path.exists():
        path.write_text("half")
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def test_only_leftovers_of_gone_writers_are_removed(tmp_path):
    out = tmp_path / "relmat.tsv"
    dead = _aged(killed_writer(out), 10)
    fields = dead.name.split(".")
    assert fields[3] == _HOST and int(fields[4]) > 0  # .relmat.tsv.HOST.PID.RANDOM.tmp
    other = tmp_path / "other.tsv"  # not an output of this call
    dead_other = _aged(killed_writer(other), 10)
    remote = _aged(tmp_path / f".{out.name}.elsewhere.123.abcdefgh.tmp", 60)  # another host: cannot be asked
    remote_old = _aged(tmp_path / f".{out.name}.elsewhere.124.abcdefgh.tmp", STALE_TEMPORARY_S + 60)
    unnamed_old = _aged(tmp_path / f".{out.name}.abcdefgh.tmp", STALE_TEMPORARY_S + 60)  # an older app's name
    started = time.time()
    with atomic_path(out) as live:  # this process writes it now
        live.write_text("in progress")
        _aged(live, 10)
        after = killed_writer(tmp_path / "late.tsv")  # dead, but newer than the call
        removed = remove_stale_temporaries([out, tmp_path / "late.tsv"], started)
        assert sorted(removed) == sorted([dead, remote_old, unnamed_old])
        assert live.exists() and remote.exists() and dead_other.exists() and after.exists()
    assert out.read_text() == "in progress"
