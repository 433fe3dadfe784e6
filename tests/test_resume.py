"""Results and their identity: settings recorded and compared, kill -9 and resume, concurrent
jobs into one OUTPUT_DIR, nothing under $HOME, derivatives a validator and pybids read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import fmriprep_layout, killed_writer

from bids_ketdcm.bids.layout import run_bids_validator
from bids_ketdcm.cli.app import main
from bids_ketdcm.io import _HOST

NET3 = [("PCC", 0, -52, 26, 8), ("mPFC", 2, 46, -2, 8), ("rIPL", 46, -62, 32, 8)]
#: Small networks keep the inversions short.
NET2 = NET3[:2]


def _raw_with_fmriprep(root: Path, template: dict, subjects=("01",)) -> Path:
    """A raw dataset with its fMRIPrep derivatives inside (``derivatives/fmriprep``)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    names = [f"sub-{s}/func/sub-{s}_task-rest_bold.nii.gz" for s in subjects]
    fmriprep_layout(root / "derivatives" / "fmriprep", names, template, raw=True)
    return root


def _network(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.tsv"
    rows = {"net2": NET2, "net3": NET3}[name]
    pd.DataFrame(rows, columns=["name", "x", "y", "z", "radius_mm"]).to_csv(path, sep="\t", index=False)
    return path


def _cli(*words: str) -> list[str]:
    return [sys.executable, "-m", "bids_ketdcm.cli.app", *words]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_run):
    """One participant processed with the defaults, OUTPUT_DIR at BIDS_DIR/derivatives/bids-ketdcm."""
    root = _raw_with_fmriprep(tmp_path_factory.mktemp("finished") / "bids", tiny_run, subjects=("01", "02"))
    out = root / "derivatives" / "bids-ketdcm"  # the BIDS convention is allowed
    net = _network(root.parent, "net2")
    assert main([str(root), str(out), "participant", "--skip-bids-validation", "--network", str(net)]) == 0
    return root, out, ["--network", str(net)]


def test_changed_settings_are_refused_then_redone_with_overwrite(finished, tmp_path, capsys):
    root, out, net = finished
    relmats = sorted(out.rglob("*_relmat.tsv"))
    stamps = [p.stat().st_mtime_ns for p in relmats]
    assert main([str(root), str(out), "participant", "--skip-bids-validation", *net]) == 0  # same settings: reused
    for option in (["--denoise", "spm"], ["--dcm-csd-model", "direct"], ["--roi-summary", "mean"],
                   ["--dcm-jacobian", "autograd"]):
        capsys.readouterr()
        assert main([str(root), str(out), "participant", "--skip-bids-validation", *net, *option]) == 2
        err = capsys.readouterr().err
        setting = {"--denoise": "DenoiseStrategy", "--dcm-csd-model": "CSDModel", "--roi-summary": "ROISummary",
                   "--dcm-jacobian": "Jacobian"}[option[0]]
        assert f"{setting}: " in err and "--overwrite" in err and "another OUTPUT_DIR" in err, err
    assert [p.stat().st_mtime_ns for p in relmats] == stamps  # nothing touched
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    assert main([str(root), str(copy), "participant", "--skip-bids-validation", "--participant-label", "01",
                 *net, "--denoise", "spm", "--overwrite"]) == 0
    redone = json.loads(next(copy.glob("sub-01/func/*_relmat.json")).read_text())
    assert redone["Settings"]["DenoiseStrategy"]["Name"] == "spm"


def test_outputs_name_inputs_by_bids_uris_and_hold_no_host_path(finished):
    root, out, _ = finished
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["SourceDatasets"] == [{"URL": "bids:raw:"}, {"URL": "bids:fmriprep:"}]
    assert description["DatasetLinks"] == {"raw": "../..", "fmriprep": "../fmriprep"}
    sidecar = json.loads(next(out.glob("sub-01/func/*_relmat.json")).read_text())
    assert sidecar["Sources"][0] == ("bids:fmriprep:sub-01/func/sub-01_task-rest_space-MNI152NLin2009cAsym_"
                                     "desc-preproc_bold.nii.gz")
    host = str(root.parent)
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".tsv", ".html", ".bib", ".bidsignore") \
                and "work" not in path.parts:
            assert host not in path.read_text(errors="replace"), path


def test_the_validator_sees_every_subject_without_error(finished):
    _, out, _ = finished
    errors, tolerated = run_bids_validator(out)
    assert errors == [] and tolerated == []
    report = json.loads(subprocess.run([str(Path(sys.executable).parent / "bids-validator-deno"), "--json",
                                        str(out)], capture_output=True, text=True).stdout)
    assert sorted(report["summary"]["subjects"]) == ["01", "02"]
    ignored = (out / ".bidsignore").read_text().split()
    assert not any(p.endswith("_mask.nii.gz") or p == "sub-*" for p in ignored)


def test_pybids_reads_the_connectivity_back(finished):
    from bids import BIDSLayout

    _, out, _ = finished
    layout = BIDSLayout(out, validate=False, derivatives=True)
    files = layout.get(suffix="relmat", extension=".tsv")
    assert len(files) == 2
    for f in files:
        ent = f.get_entities()
        assert ent["task"] == "rest" and ent["space"] == "MNI152NLin2009cAsym" and ent["segmentation"] == "net2"
    assert sorted(f.get_entities()["subject"] for f in files) == ["01", "02"]


def test_leftovers_of_killed_writers_are_removed_at_the_next_call(finished, capsys):
    """Temporary files that killed processes left beside this call's outputs go; one that a
    live process is writing (here this one) stays."""
    root, out, net = finished
    relmat = next(out.glob("sub-01/func/*seg-net2_meas-dcm_relmat.tsv"))
    dead = [killed_writer(relmat), killed_writer(out / "sub-01.html"), killed_writer(out / "dataset_description.json")]
    sidecar = relmat.with_suffix(".json")
    live = sidecar.with_name(f".{sidecar.name}.{_HOST}.{os.getpid()}.abcdefgh.tmp")  # this process writes it
    live.write_text("{}")
    time.sleep(0.05)  # all older than the call
    assert main([str(root), str(out), "participant", "--skip-bids-validation", *net]) == 0
    assert live.exists()
    live.unlink()
    assert not any(p.exists() for p in dead)
    assert "removed 3 temporary file(s) left by interrupted runs" in capsys.readouterr().err
    assert not list(out.rglob(".*.tmp"))


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - start < timeout
        time.sleep(0.05)


def test_kill_9_then_resume(tmp_path, tiny_run):
    """Killed while inverting, then after the first network's results and before its report:
    the next call completes everything, the report included, with every network on disk."""
    root = _raw_with_fmriprep(tmp_path / "bids", tiny_run)
    out = tmp_path / "out"
    words = [str(root), str(out), "participant", "--skip-bids-validation", "--network", str(_network(tmp_path, "net2")),
             "--network", str(_network(tmp_path, "net3"))]
    for moment in ("*/func/*seg-net2_desc-denoised_timeseries.tsv", "*/func/*seg-net2_meas-dcm_relmat.tsv"):
        proc = subprocess.Popen(_cli(*words), stderr=subprocess.PIPE, text=True)
        _wait_for(moment, out, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "sub-01.html").exists()
    done = subprocess.run(_cli(*words), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for seg in ("net2", "net3"):
        relmat = next(out.glob(f"sub-01/func/*seg-{seg}_meas-dcm_relmat.tsv"))
        assert json.loads(relmat.with_suffix(".json").read_text())["Converged"] in (True, False)
    report = (out / "sub-01.html").read_text()
    assert "net2" in report and "net3" in report
    (out / "sub-01.html").unlink()  # a report lost after the results: written again without redoing them
    again = subprocess.run(_cli(*words), capture_output=True, text=True)
    assert again.returncode == 0 and (out / "sub-01.html").exists()
    assert "already finished" in again.stderr


def test_concurrent_jobs_into_one_output_dir_and_nothing_under_home(tmp_path, tiny_run):
    """Two jobs at once on the same participant (one network shared, one not), with an empty $HOME
    and no cache variables set: both succeed, the report shows both networks, $HOME stays empty."""
    root = _raw_with_fmriprep(tmp_path / "bids", tiny_run)
    out = tmp_path / "out"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    base = [str(root), str(out), "participant", "--skip-bids-validation", "--network", str(_network(tmp_path, "net2"))]
    jobs = [subprocess.Popen(_cli(*base, *extra), stderr=subprocess.PIPE, text=True, env=env)
            for extra in ([], ["--network", str(_network(tmp_path, "net3"))])]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
    assert len(list(out.glob("sub-01/func/*_relmat.tsv"))) == 2
    report = (out / "sub-01.html").read_text()
    assert "net2" in report and "net3" in report
    assert list(home.rglob("*")) == []
