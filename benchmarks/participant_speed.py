"""Participant level on the demo cohort: wall time and peak memory (target <= 10 min on 2 cores).

Synthesises the 27-participant ds005917-shaped dataset with signals in the 15 regions of
``dmn15`` (the 4 regions of ``dmn4`` are among them), then runs the BIDS-App's participant
level once for both networks, exactly as a user would (``run.py BIDS OUT participant
--network dmn4 --network dmn15``), in a child process. Prints one JSON line: seconds for the
synthesis and for the participant level, the child's peak resident memory, runs inverted
per network and the convergence of the fits.

Usage: python benchmarks/participant_speed.py [--n-subjects 27] [--nprocs 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=27)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the dataset and outputs in")
    args = parser.parse_args()

    from bids_ketdcm.testing.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        start = time.perf_counter()
        bids = make_synthetic_dataset(base / "bids", n_subjects=args.n_subjects, network="dmn15", seed=args.seed)
        synth_s = time.perf_counter() - start
        out = base / "derivatives"
        command = [sys.executable, str(ROOT / "run.py"), str(bids), str(out), "participant", "--network", "dmn4",
                   "--network", "dmn15", "--skip-bids-validation", "--nprocs", str(args.nprocs)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        participant_s = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"participant level failed ({done.returncode}):\n{done.stderr[-3000:]}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        fits = {}
        for net in ("dmn4", "dmn15"):
            pattern = f"sub-*/ses-*/func/*_seg-{net}_meas-dcm_relmat.json"
            sidecars = [json.loads(p.read_text()) for p in out.glob(pattern)]
            fits[net] = {"runs": len(sidecars), "converged": sum(bool(s.get("Converged")) for s in sidecars),
                         "median_iterations": sorted(s.get("Iterations", 0) for s in sidecars)[len(sidecars) // 2]
                         if sidecars else None}
    print(json.dumps({"subjects": args.n_subjects, "nprocs": args.nprocs, "synthesis_s": round(synth_s, 1),
                      "participant_s": round(participant_s, 1), "target_s": 600,
                      "peak_rss_mb": round(peak_mb), "fits": fits}))


if __name__ == "__main__":
    main()
