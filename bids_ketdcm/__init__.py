"""bids-ketdcm: spectral DCM of resting-state fMRI to predict ketamine response."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bids-ketdcm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
