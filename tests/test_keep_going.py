"""Keep going: a participant that fails (bad input or a failure of the program, in its extraction
or inside a batch of DCM inversions) is reported at the end; the others are processed completely."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from conftest import fmriprep_layout

from bids_ketdcm.cli.app import main
from bids_ketdcm.errors import LOG_VERBOSE, Failures, InputError, ParticipantsFailed
from bids_ketdcm.participant import workflow

NET2 = [("PCC", 0, -52, 26, 8), ("mPFC", 2, 46, -2, 8)]


def _inject(monkeypatch, extraction_error: Exception) -> list[int]:
    """sub-02 fails in its extraction with ``extraction_error``; sub-03's series are marked so
    that any DCM batch holding them fails; sub-04's report fails. Returns the batch sizes the
    DCM was called with."""
    extract, fit, report = workflow.extract_timeseries, workflow.fit, workflow.write_participant_report
    marker: list[float] = []
    batches: list[int] = []

    def extract_timeseries(bold, *args, **kwargs):
        if "sub-02_" in bold.name:
            raise extraction_error
        series = extract(bold, *args, **kwargs)
        if "sub-03_" in bold.name:  # same voxels as the others (linked files): scale to tell it apart
            series.data = series.data * 1.5
            marker.append(float(series.data[0, 0]))
        return series

    def failing_fit(data, *args, **kwargs):
        batches.append(len(data))
        if np.isin(data[:, 0, 0], marker).any():
            raise RuntimeError("injected failure of the inversion")
        return fit(data, *args, **kwargs)

    def write_participant_report(path, subject, *args, **kwargs):
        if subject == "04":
            raise OSError(28, "No space left on device")
        return report(path, subject, *args, **kwargs)

    monkeypatch.setattr(workflow, "extract_timeseries", extract_timeseries)
    monkeypatch.setattr(workflow, "fit", failing_fit)
    monkeypatch.setattr(workflow, "write_participant_report", write_participant_report)
    return batches


def _run(tmp_path, tiny_run, capsys) -> tuple[int, str]:
    names = [f"sub-{s}/func/sub-{s}_task-rest_bold.nii.gz" for s in ("01", "02", "03", "04")]
    fmriprep = fmriprep_layout(tmp_path / "fmriprep", names, tiny_run, raw=True)
    net = tmp_path / "net2.tsv"
    pd.DataFrame(NET2, columns=["name", "x", "y", "z", "radius_mm"]).to_csv(net, sep="\t", index=False)
    code = main([str(fmriprep), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--network", str(net)])
    return code, capsys.readouterr().err


def test_internal_failures_in_extraction_and_inversion_leave_the_others_complete(tmp_path, tiny_run, capsys,
                                                                                   monkeypatch):
    batches = _inject(monkeypatch, RuntimeError("injected failure of the extraction"))
    code, err = _run(tmp_path, tiny_run, capsys)
    assert code == 1, err
    summary = err[err.index("bids-ketdcm: error:"):]
    assert "3 participant(s) failed (1 processed)" in summary
    assert "sub-02 task-rest net2: internal error: RuntimeError: injected failure of the extraction" in summary
    assert "sub-03 task-rest net2: internal error: RuntimeError: injected failure of the inversion" in summary
    assert "sub-04 report: internal error: OSError: [Errno 28] No space left on device" in summary
    assert "Traceback" not in err  # only with -v
    assert batches == [3, 1, 1, 1]  # sub-01, 03 and 04 together, then one by one
    out = tmp_path / "out"
    for done in ("sub-01", "sub-04"):  # sub-04's results are complete, only its report failed
        relmat = out / done / "func" / f"{done}_task-rest_space-MNI152NLin2009cAsym_seg-net2_meas-dcm_relmat.tsv"
        assert pd.read_csv(relmat, sep="\t").shape == (2, 3)
        assert json.loads(relmat.with_suffix(".json").read_text())["Converged"] in (True, False)
        assert relmat.with_name(relmat.name.replace("_relmat.tsv", "_posterior.npz")).exists()
    assert "net2" in (out / "sub-01.html").read_text()
    assert not (out / "sub-04.html").exists()
    for failed in ("sub-02", "sub-03"):  # no outputs at all, not even the time series written before the DCM
        assert not (out / failed).exists() or not [p for p in (out / failed).rglob("*") if p.is_file()]
        assert not (out / f"{failed}.html").exists()
    assert not list(out.rglob(".*.tmp"))


def test_exit_code_is_2_only_when_every_failure_is_bad_input(caplog):
    caplog.set_level(LOG_VERBOSE)  # -v: the tracebacks of failures of the program
    failures = Failures()
    failures.record("01", InputError("confounds file a.tsv: 'oops' in row 50"), "task-rest net2")
    error = failures.error(n_processed=2)
    assert isinstance(error, InputError)
    assert str(error) == ("1 participant(s) failed (2 processed):\n"
                          "sub-01 task-rest net2: confounds file a.tsv: 'oops' in row 50")
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        failures.record("02", err)
    assert caplog.text.count("Traceback") == 1 and 'raise RuntimeError("boom")' in caplog.text
    error = failures.error(n_processed=1)
    assert isinstance(error, ParticipantsFailed) and "sub-02: internal error: RuntimeError: boom" in str(error)
    assert "01" in failures and "03" not in failures
