"""The Boutiques descriptor: in step with the CLI, valid, and runnable with ``bosh``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from test_group_run import make_cohort

from bids_ketdcm.bids.derivatives import read_connectivity
from bids_ketdcm.cli.app import bids_app
from bids_ketdcm.cli.boutiques import REGENERATE, build_descriptor, render
from bids_ketdcm.testing.synth import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "boutiques.json"
BIN = Path(sys.executable).parent
BOSH = BIN / "bosh"


def _bosh(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BOSH), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _run_env(home: Path) -> dict[str, str]:
    """The console script first on PATH; HOME in the test's folder (bosh and the app write caches)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home), MPLCONFIGDIR=str(home / "mpl"))
    return env


def test_committed_descriptor_is_what_the_cli_generates():
    committed = json.loads(DESCRIPTOR.read_text())
    fresh = json.loads(render())
    stale = sorted({i["id"] for i in committed["inputs"]} ^ {i["id"] for i in fresh["inputs"]})
    assert committed == fresh, (
        f"boutiques.json is out of date with the CLI in bids_ketdcm/cli.py (inputs added or removed: "
        f"{stale or 'none; options changed'}). Regenerate it from the repository root with: {REGENERATE}")


def test_every_option_of_the_help_text_is_described():
    """Read the options off the help a user sees, not off the parameters the generator walks."""
    help_text = CliRunner().invoke(bids_app, ["--help"]).output
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)) - {"--help", "--version"}
    described = {i.get("command-line-flag") for i in build_descriptor()["inputs"]}
    assert shown and shown <= described, sorted(shown - described)
    for name in ("BIDS_DIR", "OUTPUT_DIR", "ANALYSIS_LEVEL"):
        assert f"[{name}]" in build_descriptor()["command-line"]


def test_bosh_validates_the_descriptor_as_a_bids_app():
    plain = _bosh("validate", str(DESCRIPTOR))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    bids = _bosh("validate", "--bids", str(DESCRIPTOR))
    assert bids.returncode == 0 and "BIDS validation OK" in bids.stdout + bids.stderr, bids.stdout + bids.stderr


def test_command_line_built_by_bosh_parses_back_to_the_same_values(tmp_path):
    invocation = {
        "bids_dir": "/data/my ds", "output_dir_name": "/out/derivs", "analysis_level": "participant",
        "participant_label": ["MOA101", "sub-MOA102"], "network": ["dmn4", "ket21"], "nprocs": 3,
        "seed": -4, "device": "cpu", "skip_bids_validation": True, "verbose": True, "session_label": ["d2"],
        "include_group": ["MDD"],
    }
    path = tmp_path / "invocation.json"
    path.write_text(json.dumps(invocation))
    done = _bosh("exec", "simulate", "-i", str(path), str(DESCRIPTOR))
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if "bids-ketdcm " in x)
    mkdir, command = line.split("; ", 1)
    assert shlex.split(mkdir) == ["mkdir", "-p", "/out/derivs"]
    words = shlex.split(command)
    assert words[0] == "bids-ketdcm"
    params = bids_app.make_context("bids-ketdcm", words[1:]).params
    assert str(params["bids_dir"]) == "/data/my ds" and str(params["output_dir"]) == "/out/derivs"
    assert params["participant_labels"] == ("MOA101", "sub-MOA102")
    assert params["networks"] == ("dmn4", "ket21")
    assert (params["nprocs"], params["seed"], params["device"], params["session_labels"]) == (3, -4, "cpu", ("d2",))
    assert params["include_group"] == ("MDD",)
    assert params["skip_bids_validation"] is True and params["verbose"] == 1 and params["overwrite"] is False
    assert params["task_label"] == "rest"  # the descriptor's default-value, passed on by bosh


def test_error_codes_are_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]  # up to the next heading
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", table, flags=re.M)
    assert rows, "README has no exit-code table"
    expected = [{"code": int(code), "description": text.replace("`", "")} for code, text in rows]
    assert build_descriptor()["error-codes"] == expected


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("boutiques") / "bids"
    make_synthetic_dataset(root, n_subjects=2, network="dmn4", link="planted", seed=0, n_scans=100)
    return root


def test_bosh_launch_runs_the_participant_level(dataset, tmp_path):
    out = tmp_path / "derivatives"
    invocation = tmp_path / "invocation.json"
    invocation.write_text(json.dumps({
        "bids_dir": str(dataset), "output_dir_name": str(out), "analysis_level": "participant",
        "participant_label": ["MOA102"], "skip_bids_validation": True, "nprocs": 1,
    }))
    done = _bosh("exec", "launch", "--no-container", "--skip-data-collection", str(DESCRIPTOR), str(invocation),
                 cwd=tmp_path, env=_run_env(tmp_path / "home"))
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(out.glob("sub-*/ses-b0/func/*_seg-dmn4_meas-dcm_relmat.tsv"))
    assert [f.name.split("_")[0] for f in files] == ["sub-MOA102"]
    A, names = read_connectivity(files[0])
    assert A.shape == (4, 4) and len(names) == 4
    sidecar = json.loads(files[0].with_suffix(".json").read_text())
    assert {"Converged", "FreeEnergy", "Iterations", "VarianceExplained"} <= sidecar.keys()
    shell_line = next(x for x in done.stdout.splitlines() if x.startswith("mkdir -p "))
    run_words = shlex.split(shell_line.split("; ", 1)[1])
    recorded = shlex.split(json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["CommandLine"])
    portable = [os.path.relpath(w, out) if os.path.isabs(w) else w for w in run_words[1:]]  # no host path
    assert recorded == ["bids-ketdcm", *portable]


def test_bosh_launch_runs_the_group_level(tmp_path):
    """Group level through bosh: the participant derivatives of every MDD participant of ds005917."""
    bids, out = make_cohort(tmp_path / "cohort", effect=0.5)
    invocation = tmp_path / "invocation.json"
    invocation.write_text(json.dumps({
        "bids_dir": str(bids), "output_dir_name": str(out), "participant_level_analysis_dir": str(out),
        "analysis_level": "group", "n_permutations": 0, "allow_missing": True, "nprocs": 1, "include_group": ["MDD"],
        "nested_repeats": 0,
    }))
    done = _bosh("exec", "launch", "--no-container", "--skip-data-collection", str(DESCRIPTOR), str(invocation),
                 cwd=tmp_path, env=_run_env(tmp_path / "home"))
    assert done.returncode == 0, done.stdout + done.stderr
    shell_line = next(x for x in done.stdout.splitlines() if x.startswith("mkdir -p "))
    assert shlex.split(shell_line.split("; ", 1)[1])[1:4] == [str(bids), str(out), "group"]
    results = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    assert {"ketamine", "placebo"} <= set(results.treatment) and results.headline.notna().all()
    assert (out / "group" / "report.html").is_file()


def test_bosh_refuses_a_group_invocation_without_output_dir_name(tmp_path):
    """Without output_dir_name, bosh would remove [OUTPUT_DIR] from the command line: it must refuse instead."""
    invocation = tmp_path / "invocation.json"
    invocation.write_text(json.dumps({"bids_dir": "/data", "participant_level_analysis_dir": str(tmp_path),
                                      "analysis_level": "group"}))
    done = _bosh("exec", "simulate", "-i", str(invocation), str(DESCRIPTOR))
    assert done.returncode != 0 and "output_dir_name" in done.stdout + done.stderr
    assert "bids-ketdcm /data group" not in done.stdout


def test_bosh_launch_reports_bad_input_with_the_descriptor_error_code(tmp_path):
    invocation = tmp_path / "invocation.json"
    invocation.write_text(json.dumps({"bids_dir": str(tmp_path / "missing"), "output_dir_name": str(tmp_path / "o"),
                                      "analysis_level": "participant"}))
    done = _bosh("exec", "launch", "--no-container", "--skip-data-collection", str(DESCRIPTOR), str(invocation),
                 cwd=tmp_path, env=_run_env(tmp_path / "home"))
    assert done.returncode == 2
    assert "bad input or usage" in done.stdout and f"{tmp_path / 'missing'}" in done.stdout + done.stderr
