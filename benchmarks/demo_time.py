"""Wall time of the demo (scripts/demo.sh) and of each of its steps; prints one JSON line.

Usage: ``python benchmarks/demo_time.py [--keep DIR]``. The demo runs in a temporary folder
(or DIR) with this interpreter; the CPU count and the load average before and after are
recorded, since a busy machine slows every step, and so is the CPU time of each step (user +
system of all its processes), which a busy machine does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^demo: (\w+) took ([\d.]+) s \(cpu ([\d.]+)\+([\d.]+) s\)$", re.M)


def main() -> None:
    """Run the demo once and print its timing as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="Run the demo in this folder and keep its outputs and its log "
                        "(DIR.log).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.keep or Path(scratch) / "demo_out"
        load_before = os.getloadavg()
        start = time.perf_counter()
        done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(out)], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PYTHON": sys.executable})
        total = time.perf_counter() - start
    if args.keep:
        args.keep.with_suffix(".log").write_text(done.stderr)
    if done.returncode != 0:
        sys.exit(f"the demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    found = STEP.findall(done.stderr)
    steps = {name: float(wall) for name, wall, _, _ in found}
    cpu = {name: round(float(user) + float(system), 1) for name, _, user, system in found}
    print(json.dumps({"benchmark": "demo_time", "total_s": round(total, 1), "steps_s": steps, "steps_cpu_s": cpu,
                      "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
