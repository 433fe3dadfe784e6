"""Group level: MADRS labels, A-matrix features, cross-validated prediction suite, report.

Entry point: :func:`run_group` with :class:`GroupOptions`.
"""

from bids_ketdcm.group.run import GroupOptions, run_group

__all__ = ["GroupOptions", "run_group"]
