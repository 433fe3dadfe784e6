"""BIDS-App conventions of the command line: sections in --help, verbosity, tools apart,
--mem-mb, --reports-only, and progress lines a batch log can read."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bids_ketdcm.cli import tools
from bids_ketdcm.cli.app import WORKER_MB, bids_app, group_processes, main, setup_logging
from bids_ketdcm.cli.options import OTHER, SECTIONS
from bids_ketdcm.config import ParticipantOptions
from bids_ketdcm.dcm import fit, simulate
from bids_ketdcm.errors import LOG_VERBOSE
from bids_ketdcm.participant.workflow import dcm_batching
from bids_ketdcm.testing.synth import make_synthetic_dataset


def test_help_lists_every_option_under_its_section():
    text = CliRunner().invoke(bids_app, ["--help"], terminal_width=200).output
    headers = [h for h in SECTIONS if f"\n{h}:\n" in text]
    assert headers == list(SECTIONS)  # every section, in order
    blocks = dict(zip(headers, re.split("|".join(re.escape(f"\n{h}:\n") for h in headers), text)[1:], strict=True))
    for param in bids_app.params:
        if getattr(param, "section", None) is None:
            continue
        flag = next(o for o in param.opts if o.startswith("--"))
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", blocks[param.section]), (flag, param.section)
        assert param.section != OTHER or flag == "--verbose", flag
    assert "--mem-mb" in blocks["Options to handle performance"]
    assert "simple+gsr" in text  # every denoising preset is named


def test_a_dataset_named_like_a_tool_is_a_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "out", "participant"]) == 2
    assert "BIDS_DIR synth does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_tools_program_writes_a_synthetic_dataset(tmp_path, capsys):
    assert tools.main(["synth", str(tmp_path / "ds"), "--n-subjects", "1", "--n-scans", "64"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").glob("sub-*")) == ["sub-MOA101"]
    assert tools.main(["synth"]) == 2  # usage errors exit 2, as the app's


@pytest.mark.parametrize(("verbose", "app", "library"), [
    (0, logging.INFO, logging.WARNING), (1, LOG_VERBOSE, logging.WARNING), (2, logging.DEBUG, logging.DEBUG)])
def test_each_v_adds_one_level(verbose, app, library):
    setup_logging(verbose)
    assert logging.getLogger("bids_ketdcm.participant.workflow").getEffectiveLevel() == app
    assert logging.getLogger("bids.layout").getEffectiveLevel() == library
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() == logging.WARNING
    setup_logging(0)


def test_mem_mb_bounds_the_dcm_batch_and_the_group_processes(tmp_path, capsys):
    unbounded = ParticipantOptions(bids_dir=tmp_path, output_dir=tmp_path)
    assert dcm_batching(unbounded, 21) == (32, None)
    small = ParticipantOptions(bids_dir=tmp_path, output_dir=tmp_path, mem_mb=1024)
    batch, chunk = dcm_batching(small, 21)
    assert 1 <= batch < 32 and chunk <= 128 * 2**20
    assert dcm_batching(small, 4)[0] == 32  # small networks fit whole
    assert group_processes(8, 3 * WORKER_MB + 10) == 3 and group_processes(2, None) == 2
    assert group_processes(4, 512) == 1
    assert main([str(tmp_path), str(tmp_path / "out"), "group", "--mem-mb", "100"]) == 2
    assert "--mem-mb" in capsys.readouterr().err


def test_the_engine_reports_each_subject_of_a_batch_as_it_ends():
    rng = np.random.default_rng(0)
    A = np.array([[-0.5, 0.1, 0, 0], [0.2, -0.5, 0, 0], [0, 0.1, -0.5, 0.1], [0.1, 0, 0, -0.5]])
    runs = simulate(A + rng.normal(0, 0.02, (3, 4, 4)) * (1 - np.eye(4)), 2.5, 160, 0)
    seen: list[tuple[int, int, bool]] = []
    post = fit(runs, 2.5, device="cpu", max_iterations=64, on_subject_done=lambda *a: seen.append(a))
    assert sorted(b for b, _, _ in seen) == [0, 1, 2]  # each subject once
    for b, iterations, converged in seen:
        assert iterations == int(post.iterations[b]) and converged == bool(post.converged[b])
    assert [i for _, i, _ in seen] == sorted(i for _, i, _ in seen)  # in the order they finished


@pytest.fixture(scope="module")
def participant_out(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("conventions")
    bids = make_synthetic_dataset(root / "bids", n_subjects=2, network="dmn4", seed=2, n_scans=128)
    out = root / "out"
    capture = root / "stderr.log"
    with capture.open("w") as stream, contextlib.redirect_stderr(stream):
        rc = main([str(bids), str(out), "participant", "--skip-bids-validation", "--nprocs", "1"])
    assert rc == 0, capture.read_text()
    return bids, out, capture.read_text()


def test_one_progress_line_per_run_and_network_and_no_duplicates(participant_out):
    _, out, log = participant_out
    runs = sorted(out.glob("sub-*/ses-b0/func/*_meas-dcm_relmat.tsv"))
    done = re.findall(r"sub-(\w+) (\S+) dmn4: DCM (?:converged|did NOT converge) after (\d+) iterations "
                      r"\((\d+) s elapsed\)", log)
    assert len(done) == len(runs) == 3  # sub-MOA101 has two runs
    network = re.findall(r"dmn4: 3 run\(s\) inverted \(\d converged; iterations median \d+, max \d+\), 0 skipped, "
                         r"0 finished before \(\d+ s\)", log)
    assert len(network) == 1, log
    lines = [line.split(" ", 1)[1] for line in log.splitlines() if " INFO " in line or " WARNING " in line]
    assert len(lines) == len(set(lines)), "a line was logged twice"
    assert sum("participant report" in line for line in lines) == 2


def test_reports_only_rewrites_the_reports_from_the_derivatives(participant_out, capsys):
    bids, out, _ = participant_out
    report = out / "sub-MOA101.html"
    first = report.read_text()
    derivatives = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/**/*") if p.is_file()}
    report.unlink()
    assert main([str(bids), str(out), "participant", "--reports-only", "--participant-label", "MOA101"]) == 0
    again = report.read_text()
    assert {p: p.stat().st_mtime_ns for p in derivatives} == derivatives  # nothing recomputed
    sections = re.findall(r'<section id="([^"]+)"', first)
    assert re.findall(r'<section id="([^"]+)"', again) == sections and len(sections) >= 4
    for value in re.findall(r"Free energy \(nats\)</th><td>([-\d.]+)<", first):
        assert value in again
    capsys.readouterr()
    assert main([str(bids), str(out), "group", "--reports-only"]) == 2
    assert "--reports-only is a participant-level option" in capsys.readouterr().err
    empty = out.parent / "empty"
    assert main([str(bids), str(empty), "participant", "--reports-only", "--skip-bids-validation"]) == 2
    assert "holds no finished result" in capsys.readouterr().err


def test_participant_report_holds_the_new_figures_and_readable_numbers(participant_out):
    _, out, _ = participant_out
    page = (out / "sub-MOA102.html").read_text()
    for title in (r"ROIs on the participant&#x27;s mean BOLD", "Head motion"):
        assert f"<h3>{title}</h3>" in page, title
    assert page.count("data:image/png;base64,") == 7  # rois, motion, glass brain, series, CSD, A, convergence
    ts = json.loads(next(out.glob("sub-MOA102/ses-b0/func/*_timeseries.json")).read_text())
    conn = json.loads(next(out.glob("sub-MOA102/ses-b0/func/*_relmat.json")).read_text())
    assert f"<th>Mean framewise displacement (mm)</th><td>{ts['QC']['mean_fd']:.4g}</td>" in page
    assert f"<th>Volumes kept</th><td>{ts['QC']['n_kept']}</td>" in page
    assert f"<th>Free energy (nats)</th><td>{conn['FreeEnergy']:.2f}</td>" in page
    assert "<th>Repetition time (s)</th><td>2.5</td>" in page
    assert "n_kept" not in page and "<th>tr</th>" not in page
    assert "table.data thead th" in page  # the one stylesheet, inlined from the base page
