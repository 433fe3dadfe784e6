"""``bids-ketdcm-tools``: the helper commands, apart from the BIDS-App.

The BIDS-App's first word is always a path (``BIDS_DIR``), so the helpers have their own
program and can never be mistaken for a dataset named like them::

    bids-ketdcm-tools synth OUTDIR            # or: python -m bids_ketdcm.cli.tools synth OUTDIR
    bids-ketdcm-tools dpnn-synthetic OUTDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bids_ketdcm.cli.app import run_command, setup_logging

PROGRAM = "bids-ketdcm-tools"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def tools() -> None:
    """bids-ketdcm tools: synthetic datasets and simulation experiments."""


@tools.command("synth")
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--n-subjects", type=click.IntRange(min=1),
              help="Number of participants (default: the 27 with MADRS b0 and d2).")
@click.option("--network", default="dmn4", show_default=True, help="Network whose ROIs carry the simulated signals.")
@click.option("--link", type=click.Choice(["planted", "none"]), default="planted", show_default=True,
              help="Plant a link between A and the real MADRS response, or none (null cohort).")
@click.option("--n-scans", type=click.IntRange(min=64), default=192, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True)
def synth_command(outdir: Path, n_subjects: int | None, network: str, link: str, n_scans: int, seed: int,
                  verbose: int) -> None:
    """Write a ds005917-shaped synthetic dataset (raw BIDS + fMRIPrep derivatives) to OUTDIR."""
    setup_logging(verbose)
    from bids_ketdcm.testing.synth import make_synthetic_dataset

    path = make_synthetic_dataset(outdir, n_subjects=n_subjects, network=network, link=link, seed=seed,
                                  n_scans=n_scans)
    click.echo(str(path))


@tools.command("dpnn-synthetic")
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--repeats", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True)
def dpnn_synthetic_command(outdir: Path, repeats: int, seed: int, verbose: int) -> None:
    """Run the DPNN paper's synthetic treatment-selection experiment; write results to OUTDIR."""
    setup_logging(verbose)
    from bids_ketdcm.testing.dpnn_synthetic import run_dpnn_synthetic

    result = run_dpnn_synthetic(outdir=outdir, repeats=repeats, seed=seed)
    click.echo(json.dumps(result.get("summary", {}), default=str))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bids-ketdcm-tools``: exit codes as the BIDS-App's."""
    return run_command(tools, PROGRAM, argv)


if __name__ == "__main__":
    sys.exit(main())
