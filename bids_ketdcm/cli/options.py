"""Option groups of the command line: ``--help`` lists the options section by section, as fMRIPrep's.

An option declares its section (``@option("--seed", section=WORKFLOW, ...)``); a command of
class :class:`SectionedCommand` prints one block per section, in the order of
:data:`SECTIONS`, each option once. The Boutiques descriptor reads the same attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

FILTERING = "Options for filtering BIDS queries"
ROIS = "Regions of interest and denoising"
DCM = "Spectral DCM"
FEATURES = "Features and saved models"
GROUP = "Group level"
PERFORMANCE = "Options to handle performance"
WORKFLOW = "Options for the workflow"
OTHER = "Other options"

#: The sections in the order ``--help`` prints them.
SECTIONS = (FILTERING, ROIS, DCM, FEATURES, GROUP, PERFORMANCE, WORKFLOW, OTHER)


class SectionOption(click.Option):
    """A click option that belongs to one section of the help text.

    Parameters
    ----------
    *args, **kwargs
        As :class:`click.Option`, plus ``section``: one of :data:`SECTIONS` (default
        :data:`OTHER`).
    """

    def __init__(self, *args: Any, section: str = OTHER, **kwargs: Any) -> None:
        if section not in SECTIONS:
            raise ValueError(f"unknown help section {section!r}; choose from {SECTIONS}")
        super().__init__(*args, **kwargs)
        self.section = section


def option(*param_decls: str, section: str, **attrs: Any) -> Callable:
    """``click.option`` for a :class:`SectionOption` in ``section``."""
    return click.option(*param_decls, cls=SectionOption, section=section, **attrs)


class SectionedCommand(click.Command):
    """A click command whose ``--help`` prints its options grouped by section."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Write one definition list per section (options of plain click classes go to :data:`OTHER`)."""
        rows: dict[str, list[tuple[str, str]]] = {name: [] for name in SECTIONS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                rows[getattr(param, "section", OTHER)].append(record)
        for name in SECTIONS:
            if rows[name]:
                with formatter.section(name):
                    formatter.write_dl(rows[name])
