"""Every ``--option`` a message of the package names exists (part 9 of the robustness issue).

The strings of the package's code (docstrings and comments aside) are scanned for ``--name``
words; each must be an option of the BIDS-App or of its tools, or an option of another program
the message is about (listed with the program).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click

from bids_ketdcm.cli.app import bids_app
from bids_ketdcm.cli.tools import tools

PACKAGE = Path(__file__).resolve().parents[1] / "bids_ketdcm"
#: Options of other programs that messages name, by program.
OTHER_PROGRAMS = {
    "--output-spaces": "fMRIPrep",
    "--json": "bids-validator-deno",
    "--bids": "bosh validate",
    "--no-": "click's prefix of negated flags",
}


def _options(command: click.Command) -> set[str]:
    found = {o for p in command.params for o in getattr(p, "opts", []) if o.startswith("--")}
    for sub in getattr(command, "commands", {}).values():
        found |= _options(sub)
    return found


def _message_strings(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_every_option_a_message_names_exists():
    known = _options(bids_app) | _options(tools) | {"--help", "--version"} | set(OTHER_PROGRAMS)
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _message_strings(ast.parse(path.read_text(encoding="utf-8"))):
            for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
                if option not in known and not option.startswith("--no-"):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {option}")
    assert missing == []


def test_label_options_take_several_values_as_in_fmriprep():
    from bids_ketdcm.cli.app import _expand_multi

    assert _expand_multi(["bids", "out", "participant", "--participant-label", "01", "02", "--session-label", "1",
                          "2", "--nprocs", "2"]) == [
        "bids", "out", "participant", "--participant-label", "01", "--participant-label", "02",
        "--session-label", "1", "--session-label", "2", "--nprocs", "2"]
    # positional arguments after the labels are given back to them
    assert _expand_multi(["--participant-label", "01", "02", "bids", "out", "participant"]) == [
        "--participant-label", "01", "--participant-label", "02", "bids", "out", "participant"]
    assert _expand_multi(["bids", "out", "--participant-label", "01", "participant"]) == [
        "bids", "out", "--participant-label", "01", "participant"]
    params = bids_app.make_context("bids-ketdcm", _expand_multi(
        ["bids", "out", "participant", "--participant-label", "01", "02"])).params
    assert params["participant_labels"] == ("01", "02")
