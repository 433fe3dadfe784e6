"""Boutiques descriptor of the BIDS-App, generated from the click command.

The descriptor (``boutiques.json`` at the repository root) is built from
``bids_ketdcm.cli.app.bids_app.params``, so it cannot drift from the command line:
tests/test_boutiques.py fails when the committed file differs from what this module
builds. Regenerate it with::

    python -m bids_ketdcm.cli.boutiques boutiques.json

The layout follows Boutiques' own BIDS-App template (``bosh validate --bids`` passes):
``mkdir -p [OUTPUT_DIR]; bids-ketdcm [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL]
[PARTICIPANT_LABEL] [SESSION_LABEL] ...``, with the output folder as the one output.
The template has two inputs with the value key ``[OUTPUT_DIR]``: ``output_dir_name``
(a String) and ``participant_level_analysis_dir`` (a File). ``bosh`` fills the command
line input by input and removes the key of an input without a value, so whichever of the
two comes first must always be given: ``output_dir_name`` is required at both levels, and
``participant_level_analysis_dir`` (the same folder) may be added at the group level of a
container run, so that ``bosh`` mounts the participant results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from bids_ketdcm import __version__
from bids_ketdcm.cli.app import EXIT_FAILURE, EXIT_INPUT, EXIT_OK, bids_app
from bids_ketdcm.cli.options import SECTIONS
from bids_ketdcm.io import write_text

PROGRAM = "bids-ketdcm"
CODE_URL = "https://github.com/bids-ketdcm/bids-ketdcm"
IMAGE = "ghcr.io/bids-ketdcm/bids-ketdcm"
REGENERATE = "python -m bids_ketdcm.cli.boutiques boutiques.json"

#: Parameters naming folders the app creates or writes: Boutiques ``String``, not ``File``
#: (a ``File`` must exist before the run, and container runs mount it).
WRITTEN_PATHS = frozenset({"output_dir", "work_dir", "save_model"})

#: Inputs that open the command line, in the order of Boutiques' BIDS-App template.
LEADING = ("bids_dir", "output_dir", "analysis_level", "participant_label", "session_label")

#: Exit codes, worded as the README's table (without its Markdown).
ERROR_CODES = (
    (EXIT_OK, "success"),
    (EXIT_FAILURE, "a failure of the program (message; -v shows the traceback); with several participants, "
                   "the others were processed and the summary lists every failure"),
    (EXIT_INPUT, "bad input or usage: one message naming the file or option at fault (with several "
                 "participants: every failure was bad input, the others were processed)"),
)

_OUTPUT_DIR_NAME = {
    "id": "output_dir_name",
    "name": "Output directory name",
    "type": "String",
    "description": ("Folder where the BIDS-Derivatives are written (created if missing): at the participant "
                    "level, and at the group level the folder holding the participant-level derivatives."),
    "value-key": "[OUTPUT_DIR]",
    "optional": False,
}
_PARTICIPANT_RESULTS_DIR = {
    "id": "participant_level_analysis_dir",
    "name": "Participant-level results",
    "type": "File",
    "description": ("Group level in a container: the same folder as output_dir_name, given again so that "
                    "Boutiques mounts the participant-level derivatives."),
    "value-key": "[OUTPUT_DIR]",
    "optional": True,
    "requires-inputs": ["output_dir_name"],
}


def build_descriptor(command: click.Command = bids_app) -> dict[str, Any]:
    """Build the Boutiques descriptor (schema 0.5) of a BIDS-App click command.

    Parameters
    ----------
    command
        The click command; default the app's ``bids_app``. Parameters that take no
        value (``--version``, ``--help``) and hidden ones are left out.

    Returns
    -------
    dict
        The descriptor, ready for ``json.dumps``.

    Raises
    ------
    ValueError
        When a parameter cannot be described (no help text, an unsupported click type,
        or two parameters mapping to the same Boutiques id): the message names it.
    """
    ctx = click.Context(command)
    params = [p for p in command.params if p.expose_value and not getattr(p, "hidden", False)]
    inputs: list[dict[str, Any]] = []
    for param in params:
        if param.name == "output_dir":
            inputs += [dict(_OUTPUT_DIR_NAME), dict(_PARTICIPANT_RESULTS_DIR)]
        else:
            inputs.append(_describe(param, ctx, _argument_help(command)))
    ids = [entry["id"] for entry in inputs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"parameters map to the same Boutiques id: {', '.join(duplicates)}")
    keys = [_identifier(p) for p in params]
    ordered = [k for k in LEADING if k in keys] + [k for k in keys if k not in LEADING]
    value_keys = " ".join(f"[{k.upper()}]" for k in ordered)
    return {
        "name": PROGRAM,
        "tool-version": __version__,
        "description": (command.help or "").strip().splitlines()[0],
        "author": "bids-ketdcm developers",
        "url": CODE_URL,
        "command-line": f"mkdir -p [OUTPUT_DIR]; {PROGRAM} {value_keys}",
        "schema-version": "0.5",
        "container-image": {"type": "docker", "image": f"{IMAGE}:{__version__}", "entrypoint": True},
        "inputs": inputs,
        "groups": _groups(command, params),
        "output-files": [{
            "id": "output_dir",
            "name": "Output directory",
            "description": ("BIDS-Derivatives dataset: dataset_description.json, per run "
                            "sub-<label>[/ses-<session>]/func/*_desc-denoised_timeseries.tsv and "
                            "*_meas-dcm_relmat.tsv/.json, "
                            "per participant sub-<label>.html; group/ after the group level."),
            "path-template": "[OUTPUT_DIR]",
            "optional": False,
        }],
        "error-codes": [{"code": code, "description": text} for code, text in ERROR_CODES],
        "tags": {"domain": ["neuroinformatics", "fmri", "bids-app", "dcm", "effective-connectivity"]},
        "custom": {"bids-ketdcm:regenerate": REGENERATE},
    }


def _groups(command: click.Command, params: list[click.Parameter]) -> list[dict[str, Any]]:
    """Boutiques groups: the sections of ``--help`` (:mod:`bids_ketdcm.cli.options`), in its order."""
    members: dict[str, list[str]] = {}
    for param in params:
        section = getattr(param, "section", None)
        if section is not None:
            members.setdefault(section, []).append(_identifier(param))
    return [{"id": re.sub(r"\W+", "_", name.lower()).strip("_"), "name": name, "members": members[name]}
            for name in SECTIONS if name in members]


def render(descriptor: dict[str, Any] | None = None) -> str:
    """The descriptor as the committed file holds it: 2-space JSON and a final newline."""
    return json.dumps(build_descriptor() if descriptor is None else descriptor, indent=2) + "\n"


def _identifier(param: click.Parameter) -> str:
    """Boutiques id: the long option name (``--participant-label`` -> ``participant_label``)."""
    if isinstance(param, click.Option):
        long = [o for o in param.opts if o.startswith("--")]
        return (long or param.opts)[0].lstrip("-").replace("-", "_")
    return str(param.name)


def _argument_help(command: click.Command) -> dict[str, str]:
    """Descriptions of positional arguments from the ``NAME  text`` lines of the command help."""
    found = {}
    for line in (command.help or "").splitlines():
        words = line.strip().split(None, 1)
        if len(words) == 2 and words[0].isupper():
            found[words[0].lower()] = words[1]
    return found


def _describe(param: click.Parameter, ctx: click.Context, argument_help: dict[str, str]) -> dict[str, Any]:
    ident = _identifier(param)
    option = param if isinstance(param, click.Option) else None
    text = option.help if option is not None else argument_help.get(ident)
    if not text:
        raise ValueError(f"{ident}: no help text; add one in bids_ketdcm/cli.py (it becomes the description)")
    entry: dict[str, Any] = {
        "id": ident,
        "name": ident.replace("_", " ").capitalize(),
        "description": " ".join(text.split()),
        "value-key": f"[{ident.upper()}]",
        "optional": not param.required,
    }
    if option is not None and (option.is_flag or option.count):
        entry["type"] = "Flag"
        entry["command-line-flag"] = _flag(option)
        return entry
    entry.update(_value_type(param, ident))
    if option is not None:
        entry["command-line-flag"] = _flag(option)
    if param.multiple or param.nargs == -1:
        entry["list"] = True
        if option is not None:  # click repeats the option once per value
            entry["list-separator"] = f" {_flag(option)} "
    elif param.nargs > 1:
        entry.update({"list": True, "min-list-entries": param.nargs, "max-list-entries": param.nargs})
    default = param.get_default(ctx, call=False)
    if isinstance(default, (str, int, float, Path)) and not isinstance(default, bool):
        entry["default-value"] = _cast(default, entry["type"])
    elif isinstance(default, (tuple, list)) and default:
        entry["default-value"] = [_cast(v, entry["type"]) for v in default]
    return entry


def _flag(option: click.Option) -> str:
    """The option as written on the command line; for an on-by-default switch, its 'off' form."""
    if option.is_flag and not option.count and option.default is True:
        off = [o for o in option.secondary_opts if o.startswith("--")]
        if not off:
            raise ValueError(f"{option.name}: a flag that defaults to on needs an --no-... form to describe")
        return off[0]
    long = [o for o in option.opts if o.startswith("--")]
    return (long or option.opts)[0]


def _value_type(param: click.Parameter, ident: str) -> dict[str, Any]:
    kind = param.type
    if isinstance(kind, click.Choice):
        return {"type": "String", "value-choices": [str(c) for c in kind.choices]}
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        spec: dict[str, Any] = {"type": "Number", "integer": isinstance(kind, click.types.IntParamType)}
        if isinstance(kind, (click.IntRange, click.FloatRange)):
            if kind.min is not None:
                spec["minimum"] = kind.min
                if kind.min_open:
                    spec["exclusive-minimum"] = True
            if kind.max is not None:
                spec["maximum"] = kind.max
                if kind.max_open:
                    spec["exclusive-maximum"] = True
        return spec
    if isinstance(kind, (click.Path, click.File)):
        written = param.name in WRITTEN_PATHS or getattr(kind, "writable", False)
        return {"type": "String" if written else "File"}
    if isinstance(kind, click.types.StringParamType):
        return {"type": "String"}
    raise ValueError(f"{ident}: click type {kind.name!r} has no Boutiques mapping; extend "
                     "bids_ketdcm.cli.boutiques._value_type")


def _cast(value: Any, boutiques_type: str) -> Any:
    if boutiques_type == "Number":
        return value
    return str(value)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
def main(path: Path | None) -> None:
    """Write the Boutiques descriptor to PATH (default: print it)."""
    text = render()
    if path is None:
        click.echo(text, nl=False)
        return

    write_text(path, text)


if __name__ == "__main__":
    main()
