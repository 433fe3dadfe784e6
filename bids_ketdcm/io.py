"""Atomic writers: an output file either exists complete or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from bids_ketdcm.errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    Parameters
    ----------
    path
        Final destination. Its parent folder is created if needed.

    Yields
    ------
    Path
        Temporary file in the same folder (so the final rename is atomic). It is
        removed if the body raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically; numpy scalars/arrays are converted."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_tsv(path: str | os.PathLike, table: pd.DataFrame, index: bool = False) -> None:
    """Write a DataFrame as a BIDS TSV (tab separated, ``n/a`` for missing) atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=index, na_rep="n/a", lineterminator="\n")


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity (not valid JSON) replaced by None, recursively.

    Dict keys become strings, tuples and arrays lists, paths strings.
    """
    import numpy as np

    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite_json(value.tolist())
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def load_image(path: str | os.PathLike, what: str) -> nib.spatialimages.SpatialImage:
    """Read a NIfTI (or other volume) image, or fail with one clear message.

    Parameters
    ----------
    path
        The image file.
    what
        What the image is, for messages (e.g. ``"brain mask"``).

    Returns
    -------
    nibabel.spatialimages.SpatialImage

    Raises
    ------
    InputError
        The file is missing, cannot be read, or is not a volume image (e.g. a surface).
    """
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputError(f"{what} {path} cannot be read: {err}") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputError(f"{what} {path} cannot be read: not a volume image ({type(img).__name__})")
    return img


def read_json_object(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """Read a JSON file that must hold an object, or fail with one clear message.

    Parameters
    ----------
    path
        The file.
    what
        What the file is, put before its path in messages (e.g. ``"--bids-filter-file"``).

    Returns
    -------
    dict

    Raises
    ------
    InputError
        The file is missing, unreadable, not JSON, or not a JSON object.
    """
    where = f"{what} {path}" if what else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{where} is not valid JSON: {err}") from None
    return parse_json_object(text, where)


def parse_json_object(data: str | bytes, where: str) -> dict[str, Any]:
    """Parse JSON text that must hold an object, or fail with one clear message.

    For content already read (e.g. bytes that are also hashed, or a package resource);
    :func:`read_json_object` reads a file with this rule.

    Parameters
    ----------
    data
        The JSON text (bytes: UTF-8, -16 or -32, as :func:`json.loads` detects).
    where
        The source named in messages (e.g. ``"--denoise mine.json"``).

    Returns
    -------
    dict

    Raises
    ------
    InputError
        ``data`` is not JSON, or not a JSON object.
    """
    try:
        content = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise InputError(f"{where} must hold a JSON object")
    return content
