"""What the container runs, run here without Docker.

The Dockerfile's ENTRYPOINT (and CMD, ENV, WORKDIR) are read from the file itself and run
with the installed console script. The environment is the image's (``ENV``), with the
container's ``/tmp`` played by a scratch folder, and ``HOME`` a read-only host folder as
under Apptainer. A Python audit hook (loaded through ``sitecustomize``; the command line
itself is untouched) records every file the program opens for writing, creates, renames
or deletes, and every network look-up: all writes must land in the output folder or the
container's ``/tmp``, and there must be no network traffic. Snapshots of the input
dataset and of HOME catch writes the hook cannot see (native code).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_ketdcm import __version__
from bids_ketdcm.testing.synth import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

AUDIT_HOOK = r'''
import os, sys

_LOG = os.environ.get("KETDCM_AUDIT_LOG")
if _LOG:
    _FD = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _PATH_EVENTS = {"os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.truncate": 0, "shutil.rmtree": 0,
                    "os.chmod": 0, "os.rename": 1, "os.symlink": 1, "os.link": 1, "shutil.copyfile": 1,
                    "shutil.copytree": 1, "sqlite3.connect": 0}

    def _record(kind, path):
        if path is None or isinstance(path, int):
            return
        path = os.fsdecode(path)
        if path in ("", ":memory:"):
            return
        if not os.path.isabs(path):
            path = os.path.join(os.getcwd(), path)
        os.write(_FD, (kind + "\t" + path + "\n").encode("utf-8", "surrogateescape"))

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & _WRITING):
                _record("write", path)
        elif event in _PATH_EVENTS:
            _record(event, args[_PATH_EVENTS[event]])
            if event == "os.rename":
                _record(event, args[0])
        elif event in ("socket.getaddrinfo", "socket.connect", "socket.sendto", "urllib.Request"):
            os.write(_FD, ("net\t" + event + " " + repr(args[:2]) + "\n").encode("utf-8", "replace"))

    sys.addaudithook(_hook)
'''


def parse_dockerfile(path: Path) -> dict:
    """ARG defaults, ENV, WORKDIR, ENTRYPOINT and CMD of the Dockerfile's final stage.

    Supports what this project's Dockerfile uses: ``\\`` continuations, ``ARG NAME=default``,
    ``ENV a=b c=d`` with ``$NAME`` / ``${NAME}`` references, and exec-form (JSON)
    ENTRYPOINT/CMD; anything else in those instructions fails loudly.
    """
    text = re.sub(r"\\\n", " ", "\n".join(x for x in path.read_text().splitlines() if not x.lstrip().startswith("#")))
    stage: dict = {}
    global_args: dict[str, str] = {}
    for line in filter(None, (x.strip() for x in text.splitlines())):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":  # a new stage sees only the global ARGs it declares again
            stage = {"ARG": {}, "ENV": {}, "WORKDIR": "/"}
            continue
        values = {**stage.get("ARG", {}), **stage.get("ENV", {})}

        def expand(value: str, values: dict = values) -> str:
            return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ""), value)

        if instruction == "ARG":
            name, sep, default = rest.partition("=")
            if not stage:
                global_args[name] = default
            else:
                stage["ARG"][name] = expand(default) if sep else global_args.get(name, "")
        elif instruction == "ENV":
            for word in shlex.split(rest):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {word!r}: use the KEY=value form"
                stage["ENV"][key] = expand(value)
        elif instruction == "WORKDIR":
            stage["WORKDIR"] = expand(rest)
        elif instruction in ("ENTRYPOINT", "CMD"):
            assert rest.startswith("["), f"{instruction} must use the exec (JSON) form: {rest}"
            stage[instruction] = json.loads(rest)
    return stage


DOCKERFILE = parse_dockerfile(ROOT / "Dockerfile")


def _under(path: str, root: Path) -> bool:
    return Path(path) == root or root in Path(path).parents


def _snapshot(root: Path) -> list[tuple]:
    return sorted((str(p.relative_to(root)), p.is_dir(), p.stat().st_size if p.is_file() else 0,
                   p.stat().st_mtime_ns, p.stat().st_mode) for p in [root, *root.rglob("*")])


def _container_env(scratch: Path, home: Path, hook_dir: Path, audit_log: Path) -> dict[str, str]:
    """The image's ENV with /tmp -> scratch; PATH leads to the installed console script."""
    env = {"PATH": f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for key, value in DOCKERFILE["ENV"].items():
        if key != "PATH":
            env[key] = re.sub(r"^/tmp(?=/|$)", str(scratch), value)
    env.update(HOME=str(home), TMPDIR=str(scratch), PYTHONPATH=str(hook_dir), KETDCM_AUDIT_LOG=str(audit_log))
    return env


def _entrypoint() -> list[str]:
    command = list(DOCKERFILE["ENTRYPOINT"])
    found = shutil.which(command[0], path=str(BIN))
    assert found, f"the ENTRYPOINT {command[0]!r} is not an installed console script in {BIN}"
    return [found, *command[1:]]


def test_dockerfile_entrypoint_is_the_bids_app_and_version_matches():
    assert DOCKERFILE["ENTRYPOINT"] == ["bids-ketdcm"]
    assert DOCKERFILE["ARG"]["VERSION"] == __version__, "Dockerfile ARG VERSION differs from the package version"
    assert DOCKERFILE["ENV"]["BIDS_KETDCM_CONTAINER"].endswith(f":{__version__}")
    for key in ("HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "NILEARN_DATA", "DENO_DIR"):
        assert _under(DOCKERFILE["ENV"][key], Path("/tmp")), f"ENV {key} is not under the writable /tmp"
    done = subprocess.run([*_entrypoint(), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"bids-ketdcm, version {__version__}"
    default = subprocess.run([*_entrypoint(), *DOCKERFILE["CMD"]], capture_output=True, text=True, timeout=120)
    assert default.returncode == 0 and "BIDS_DIR OUTPUT_DIR" in default.stdout


@pytest.fixture()
def sandbox(tmp_path):
    """data (input, read-only), out, the container's /tmp, a read-only HOME, the audit hook."""
    data = tmp_path / "data"
    make_synthetic_dataset(data, n_subjects=2, network="dmn4", link="planted", seed=0, n_scans=100)
    places = {"data": data, "out": tmp_path / "out", "scratch": tmp_path / "container_tmp", "home": tmp_path / "home",
              "hook": tmp_path / "hook", "log": tmp_path / "audit.log"}
    for key in ("scratch", "home", "hook"):
        places[key].mkdir()
    (places["hook"] / "sitecustomize.py").write_text(AUDIT_HOOK)
    read_only = [data, *[p for p in data.rglob("*") if p.is_dir()], places["home"]]
    for folder in read_only:
        folder.chmod(0o555)
    yield places
    for folder in read_only:
        folder.chmod(0o755)


def test_container_command_line_writes_only_to_the_output(sandbox):
    data, out, scratch, home = sandbox["data"], sandbox["out"], sandbox["scratch"], sandbox["home"]
    before = _snapshot(data)
    arguments = [str(data), str(out), "participant", "--participant-label", "MOA102", "--skip-bids-validation",
                 "--nprocs", "1"]
    workdir = Path(re.sub(r"^/tmp(?=/|$)", str(scratch), DOCKERFILE["WORKDIR"]))
    env = _container_env(scratch, home, sandbox["hook"], sandbox["log"])
    done = subprocess.run([*_entrypoint(), *arguments], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    connectivity = sorted(out.glob("sub-*/ses-b0/func/*_seg-dmn4_meas-dcm_relmat.tsv"))
    assert [p.name.split("_")[0] for p in connectivity] == ["sub-MOA102"]
    assert connectivity[0].with_suffix(".json").exists() and (out / "sub-MOA102.html").exists()
    assert not list(out.glob("sub-MOA101*"))

    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated["Version"] == __version__
    recorded = shlex.split(generated["CommandLine"])
    portable = [os.path.relpath(w, out) if os.path.isabs(w) else w for w in arguments]  # no host path
    assert recorded == ["bids-ketdcm", *portable]
    assert generated["Container"] == {"Type": "docker", "Tag": DOCKERFILE["ENV"]["BIDS_KETDCM_CONTAINER"],
                                      "URI": "docker://" + DOCKERFILE["ENV"]["BIDS_KETDCM_CONTAINER"]}

    events = [line.split("\t", 1) for line in sandbox["log"].read_text().splitlines()]
    assert events, "the audit hook recorded nothing: it was not loaded"
    network = [path for kind, path in events if kind == "net"]
    assert not network, network
    stray = sorted({path for kind, path in events if not (_under(path, out) or _under(path, scratch))})
    assert not stray, f"written outside the output folder and the container's /tmp: {stray}"
    assert _snapshot(data) == before, "the input dataset changed"
    assert not any(home.iterdir()), f"HOME was written: {list(home.iterdir())}"
