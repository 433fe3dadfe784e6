"""Denoising strategies as data: JSON files naming a nilearn confound loader and its parameters.

The presets live in ``bids_ketdcm/data/denoise/NAME.json`` (as Giga Connectome keeps its
strategies); ``--denoise`` takes a preset name or the path of a user's own file of the
same form::

    {"name": "my-strategy",
     "description": "free text for the sidecars and the methods paragraph",
     "function": "load_confounds" | "load_confounds_strategy",
     "parameters": {"strategy": ["high_pass", "motion", "wm_csf"], "motion": "basic"}}

``parameters`` are keyword arguments of that nilearn function
(:mod:`nilearn.interfaces.fmriprep`); names the function does not take are refused. The
sidecars record the strategy with its name, the file's name and its SHA-256.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from bids_ketdcm.errors import InputError
from bids_ketdcm.io import parse_json_object

#: The nilearn loaders a strategy may name.
FUNCTIONS = ("load_confounds", "load_confounds_strategy")
_KEYS = {"name", "description", "function", "parameters"}


@dataclass(frozen=True)
class DenoiseStrategy:
    """One confound strategy, read from its JSON file.

    Attributes
    ----------
    name
        The strategy's own name (``--denoise`` of a preset).
    description
        Free text (sidecars, report).
    function
        ``load_confounds`` or ``load_confounds_strategy``.
    parameters
        Keyword arguments of ``function``.
    file
        File name (no folder: outputs hold no host paths); ``NAME.json`` for a preset.
    sha256
        SHA-256 of the file's bytes.
    builtin
        Whether it is one of the package's presets.
    """

    name: str
    description: str
    function: str
    parameters: dict[str, Any] = field(default_factory=dict)
    file: str = ""
    sha256: str = ""
    builtin: bool = True

    def record(self) -> dict[str, Any]:
        """What a sidecar records of the strategy (BIDS-style keys)."""
        return {"Name": self.name, "Description": self.description, "File": self.file, "SHA256": self.sha256,
                "Builtin": self.builtin, "Function": self.function, "Parameters": self.parameters}


def preset_names() -> list[str]:
    """Names of the package's presets (``data/denoise/*.json``), sorted."""
    folder = resources.files("bids_ketdcm") / "data" / "denoise"
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_strategy(spec: str | Path) -> DenoiseStrategy:
    """A preset by name, or a user's strategy file by path.

    Parameters
    ----------
    spec
        A name of :func:`preset_names`, or the path of a JSON file (it must end in ``.json``).

    Returns
    -------
    DenoiseStrategy

    Raises
    ------
    InputError
        An unknown name, an unreadable file, or a file whose content is not a valid
        strategy (the message names the file and what is wrong).
    """
    return _load(str(spec))


@lru_cache(maxsize=32)
def _load(spec: str) -> DenoiseStrategy:
    if not spec.endswith(".json"):
        if spec not in preset_names():
            raise InputError(f"--denoise {spec!r} is not a known strategy; choose one of "
                             f"{', '.join(preset_names())} or give the path of a strategy JSON file")
        data = (resources.files("bids_ketdcm") / "data" / "denoise" / f"{spec}.json").read_bytes()
        return _parse(data, f"{spec}.json", where=f"preset {spec}", builtin=True)
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"--denoise {spec}: cannot read the strategy file ({err.strerror})") from None
    return _parse(data, path.name, where=f"--denoise {spec}", builtin=False)


def _parse(data: bytes, file: str, where: str, builtin: bool) -> DenoiseStrategy:
    from nilearn.interfaces import fmriprep

    content = parse_json_object(data, where)
    unknown, missing = set(content) - _KEYS, {"name", "function"} - set(content)
    if unknown or missing:
        raise InputError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {', '.join(sorted(unknown))}"] if unknown else [])
            + ([f"missing key(s) {', '.join(sorted(missing))}"] if missing else [])))
    function, parameters = content["function"], content.get("parameters", {})
    if function not in FUNCTIONS:
        raise InputError(f"{where}: function {function!r} is not one of {', '.join(FUNCTIONS)}")
    if not isinstance(parameters, dict):
        raise InputError(f"{where}: parameters must be a JSON object of keyword arguments of {function}")
    loader = getattr(fmriprep, function)
    accepted = set(inspect.signature(loader).parameters) - {"img_files", "kwargs"}
    if function == "load_confounds_strategy":  # its **kwargs are load_confounds' parameters
        accepted |= set(inspect.signature(fmriprep.load_confounds).parameters) - {"img_files"}
    wrong = sorted(set(parameters) - accepted)
    if wrong:
        raise InputError(f"{where}: {function} takes no parameter(s) {', '.join(wrong)} "
                         f"(it takes {', '.join(sorted(accepted))})")
    if not isinstance(content["name"], str) or not content["name"]:
        raise InputError(f"{where}: name must be a non-empty string")
    return DenoiseStrategy(name=content["name"], description=str(content.get("description", "")), function=function,
                           parameters=parameters, file=file, sha256=hashlib.sha256(data).hexdigest(), builtin=builtin)
