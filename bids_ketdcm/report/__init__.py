"""HTML reports: the participant-level page (one per subject) and its methods text."""

from bids_ketdcm.report.methods import citations_bibtex, cited_software_versions, methods_paragraph
from bids_ketdcm.report.participant import (
    DEFAULT_QC_THRESHOLDS,
    RunResult,
    run_warnings,
    update_participant_report,
    write_participant_report,
)

__all__ = [
    "DEFAULT_QC_THRESHOLDS",
    "RunResult",
    "citations_bibtex",
    "methods_paragraph",
    "run_warnings",
    "cited_software_versions",
    "update_participant_report",
    "write_participant_report",
]
