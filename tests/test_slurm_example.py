"""examples/slurm_array.sh, run here without Slurm or Apptainer.

Stand-ins on PATH take their place: ``sbatch`` records its arguments and the environment
the job would get (``--export=ALL``) and prints a job id; ``apptainer`` records its
arguments, ``build`` writes the image file, and ``run`` applies the container's view
(``APPTAINERENV_*`` into the environment, the folder bound on ``/tmp`` as the image's
``/tmp``) and runs the installed ``bids-ketdcm`` with the words after the image. The test
then starts the array task the way Slurm would, with the recorded environment plus
``SLURM_*`` variables, and checks the outputs, the resume and the group job's submission.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_ketdcm import __version__
from bids_ketdcm.testing.synth import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm_array.sh"
BIN = Path(sys.executable).parent

FAKE_SBATCH = r'''
import json, os, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_LOG"])
calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
job_id = 1000 + len(calls)
with log.open("a") as f:
    f.write(json.dumps({"tool": "sbatch", "argv": sys.argv[1:], "env": dict(os.environ), "id": job_id}) + "\n")
print(job_id if "--parsable" in sys.argv else f"Submitted batch job {job_id}")
'''

FAKE_APPTAINER = r'''
import json, os, re, sys
from pathlib import Path
args = sys.argv[1:]
with Path(os.environ["FAKE_SLURM_LOG"]).open("a") as f:
    f.write(json.dumps({"tool": "apptainer", "argv": args}) + "\n")
if args[0] == "build":
    Path(args[1]).write_text("image of " + args[2])
    sys.exit(0)
assert args[0] == "run", args
words, env, binds = args[1:], dict(os.environ), {}
while words[0].startswith("-"):
    option = words.pop(0)
    if option in ("--bind", "--pwd"):
        value = words.pop(0)
        if option == "--bind":
            source, target = value.split(":")[:2]
            binds[target] = source
    else:
        assert option in ("--cleanenv", "--containall", "--nv"), option
image = words.pop(0)
assert Path(image).is_file(), image
for key in list(env):
    if key.startswith("APPTAINERENV_"):
        env[key[len("APPTAINERENV_"):]] = env.pop(key)
if "/tmp" in binds:
    for key in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR", "TMPDIR"):
        env[key] = binds["/tmp"] + "/" + key.lower()
for target, source in binds.items():
    assert target == "/tmp" or target == source, ("bound elsewhere than its own path", source, target)
os.execve(os.environ["FAKE_APP"], [os.environ["FAKE_APP"], *words], env)
'''


def _tool(folder: Path, name: str, source: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(0o755)


def _calls(log: Path, tool: str) -> list[dict]:
    return [call for call in map(json.loads, log.read_text().splitlines()) if call["tool"] == tool]


def _value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


@pytest.fixture()
def cluster(tmp_path):
    if not shutil.which("bash") or not shutil.which("sed") or not shutil.which("awk"):
        pytest.skip("bash, sed and awk are needed")
    data = tmp_path / "ds"
    make_synthetic_dataset(data, n_subjects=3, network="dmn4", link="planted", seed=0, n_scans=100)
    # one participant without fMRIPrep outputs is left out of the array
    shutil.rmtree(data / "derivatives" / "fmriprep" / "sub-MOA104")
    fake_bin = tmp_path / "fake_bin"
    fake_bin.mkdir()
    _tool(fake_bin, "sbatch", FAKE_SBATCH)
    _tool(fake_bin, "apptainer", FAKE_APPTAINER)
    app = shutil.which("bids-ketdcm", path=str(BIN))
    assert app, f"bids-ketdcm is not installed in {BIN}"
    env = {"PATH": f"{fake_bin}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "USER": "tester",
           "SCRATCH_ROOT": str(tmp_path / "scratch"), "FAKE_SLURM_LOG": str(tmp_path / "slurm.jsonl"),
           "FAKE_APP": app, "OMP_NUM_THREADS": "1"}
    return {"data": data, "out": tmp_path / "out", "scratch": tmp_path / "scratch", "log": tmp_path / "slurm.jsonl",
            "env": env}


def test_slurm_array_submits_one_task_per_participant_then_the_group_job(cluster):
    data, out, scratch, log = cluster["data"], cluster["out"], cluster["scratch"], cluster["log"]
    submit = subprocess.run(
        ["bash", str(SCRIPT), str(data), str(out), "--skip-bids-validation", "--", "--n-permutations", "10"],
        env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert "left out: MOA104" in submit.stderr

    sif = scratch / "images" / f"bids-ketdcm-{__version__}.sif"
    builds = [c["argv"] for c in _calls(log, "apptainer") if c["argv"][0] == "build"]
    assert builds == [["build", f"{sif}.partial", f"docker://ghcr.io/bids-ketdcm/bids-ketdcm:{__version__}"]]
    assert sif.is_file() and f"bids-ketdcm, version {__version__}" in submit.stdout
    listed = (out / "logs" / "slurm" / "participants.txt").read_text().split()
    assert listed == ["MOA101", "MOA102"]

    array, group = _calls(log, "sbatch")
    argv = array["argv"]
    assert _value(argv, "--array") == "1-2%50" and "--parsable" in argv and "--export=ALL" in argv
    assert "--gres" not in argv and _value(argv, "--cpus-per-task") == "4"
    script_at = argv.index(str(SCRIPT))
    assert argv[script_at + 1:] == ["__participant", str(data), str(out), "--skip-bids-validation"]
    gargv = group["argv"]
    assert _value(gargv, "--dependency") == f"afterok:{array['id']}" and "--kill-on-invalid-dep=yes" in gargv
    assert gargv[gargv.index(str(SCRIPT)) + 1:] == ["__group", str(data), str(out), "--n-permutations", "10"]

    # array task 2 as Slurm starts it: the submission's environment plus SLURM_* variables
    job_env = {**array["env"], "SLURM_JOB_ID": "1002", "SLURM_ARRAY_JOB_ID": str(array["id"]),
               "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "1"}
    task = [str(SCRIPT), *argv[script_at + 1:]]
    done = subprocess.run(["bash", *task], env=job_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    connectivity = sorted(out.glob("sub-*/ses-b0/func/*_seg-dmn4_meas-dcm_relmat.tsv"))
    assert [p.name.split("_")[0] for p in connectivity] == ["sub-MOA102"]
    assert not (scratch / "work" / f"{array['id']}_2").exists(), "the task's work folder is left after success"

    run = [c["argv"] for c in _calls(log, "apptainer") if c["argv"][0] == "run"][-1]
    assert "--nv" not in run and "--containall" in run and "--cleanenv" in run
    assert f"{data}:{data}:ro" in run and f"{out}:{out}" in run
    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    recorded = shlex.split(generated["CommandLine"])
    program = next(i for i, word in enumerate(recorded) if Path(word).name == "bids-ketdcm")
    # paths are recorded relative to OUTPUT_DIR (no host path in the outputs)
    assert recorded[program + 1:program + 5] == [os.path.relpath(data, out), ".", "participant", "--nprocs"]
    assert _value(recorded, "--participant-label") == "MOA102" and _value(recorded, "--device") == "cpu"
    assert _value(recorded, "--work-dir") == os.path.relpath(scratch / "work" / f"{array['id']}_2" / "work", out)
    assert recorded[-1] == "--skip-bids-validation"

    # resume: the same task again finds its outputs and leaves them as they are
    before = connectivity[0].stat().st_mtime_ns
    again = subprocess.run(["bash", *task], env=job_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 finished before" in again.stderr and connectivity[0].stat().st_mtime_ns == before

    # a second submission with the image in place builds nothing; TASKS picks array indices
    env = {**cluster["env"], "TASKS": "1", "NO_GROUP": "1", "GPU": "1", "SIF": str(sif)}
    resubmit = subprocess.run(["bash", str(SCRIPT), str(data), str(out), "--skip-bids-validation"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert resubmit.returncode == 0, resubmit.stderr[-3000:]
    assert len([c for c in _calls(log, "apptainer") if c["argv"][0] == "build"]) == 1
    last = _calls(log, "sbatch")[2:]
    assert len(last) == 1, "NO_GROUP=1 still submitted the group job"
    assert _value(last[0]["argv"], "--array") == "1%50"
    assert _value(last[0]["argv"], "--gres") == "gpu:1" and _value(last[0]["argv"], "--partition") == "gpu"


def test_slurm_array_fails_clearly_outside_slurm_and_without_a_runtime(cluster, tmp_path):
    no_runtime = {**cluster["env"], "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(SCRIPT), str(cluster["data"]), str(cluster["out"])], env=no_runtime,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "neither apptainer nor singularity" in done.stderr
    task = subprocess.run(["bash", str(SCRIPT), "__participant", str(cluster["data"]), str(cluster["out"])],
                          env=cluster["env"], capture_output=True, text=True, timeout=60)
    assert task.returncode != 0 and "not in a Slurm array task" in task.stderr
