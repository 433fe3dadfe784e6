"""Provenance of a run: the exact command line, software versions and container.

These fill ``GeneratedBy`` in the derivative ``dataset_description.json`` so every
output says which program, version, command and image produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from bids_ketdcm import __version__

#: Distributions whose versions change results (or how they are computed).
DISTRIBUTIONS = ("torch", "numpy", "scipy", "pandas", "scikit-learn", "nibabel", "nilearn", "pybids", "click")

#: Set in the container image (see ``Dockerfile``) to the image reference it was built as.
CONTAINER_ENV = "BIDS_KETDCM_CONTAINER"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line as a shell would take it back, each word quoted where needed.

    Parameters
    ----------
    argv
        Words of the command. Default: ``sys.orig_argv``, the words this process was
        started with, interpreter included (``python -m bids_ketdcm.cli.app ...``,
        ``python run.py ...``, or the interpreter named by a console script's
        ``#!`` line followed by the script's path), so the line can be run again as is.

    Returns
    -------
    str
        ``shlex.join`` of the words.
    """
    words = sys.orig_argv if argv is None else argv
    return shlex.join(str(word) for word in words)


def distribution_versions(names: Sequence[str], missing: str | None = None) -> dict[str, str]:
    """Installed versions of the named distributions (``importlib.metadata``).

    Parameters
    ----------
    names
        Distribution names (``scikit-learn``, not ``sklearn``).
    missing
        Value for a distribution that is not installed; None leaves it out.

    Returns
    -------
    dict
        Distribution name to version string, in the order of ``names``.
    """
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            if missing is not None:
                versions[name] = missing
    return versions


def software_versions(distributions: Sequence[str] = DISTRIBUTIONS) -> dict[str, str]:
    """Versions of Python, bids-ketdcm and the installed ones of ``distributions``.

    Parameters
    ----------
    distributions
        Distribution names (default :data:`DISTRIBUTIONS`).

    Returns
    -------
    dict
        Distribution name to version string; a library that is not installed is left out.
    """
    return {"python": platform.python_version(), "bids-ketdcm": __version__,
            **distribution_versions(distributions)}


def container() -> dict[str, str] | None:
    """BIDS ``GeneratedBy.Container`` when running inside the published image, else None.

    The image sets ``BIDS_KETDCM_CONTAINER`` to its reference (``ghcr.io/...:VERSION``);
    Apptainer/Singularity keep the image's environment and add ``APPTAINER_CONTAINER``
    or ``SINGULARITY_CONTAINER``, which tells the two runtimes apart.

    Returns
    -------
    dict or None
        ``Type`` (``docker`` or ``singularity``), ``Tag`` (the image reference) and
        ``URI`` (``docker://`` + the reference).
    """
    tag = os.environ.get(CONTAINER_ENV)
    if not tag:
        return None
    runtime = "singularity" if {"APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"} & os.environ.keys() else "docker"
    return {"Type": runtime, "Tag": tag, "URI": f"docker://{tag}"}
