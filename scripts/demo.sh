#!/usr/bin/env bash
# The demo: synthesise a ds005917-shaped dataset, run the participant level for every
# subject (dmn4), then the group level (prediction suite and ketamine-vs-placebo treatment
# selection), and print where the reports are. Each step prints its wall and CPU time on
# stderr ("demo: STEP took N s (cpu USER+SYS s)"; benchmarks/demo_time.py reads these lines).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-demo_out}
rm -rf "$OUT"
step() {  # step NAME COMMAND...: run it and print its wall time and the CPU time of its processes
    local TIMEFORMAT="demo: $1 took %R s (cpu %U+%S s)"
    shift
    time "$@"
}
step synth "$PY" -m bids_ketdcm.cli.tools synth "$OUT/bids" --network dmn4 --link planted --seed 0
step participant "$PY" run.py "$OUT/bids" "$OUT/derivatives" participant --network dmn4
step group "$PY" run.py "$OUT/bids" "$OUT/derivatives" group --include-group MDD --n-permutations 200 \
    --nested-repeats 2 --nested-permutations 50 --allow-missing --treatment-selection --treatment-repeats 2
reports=("$OUT"/derivatives/sub-*.html)
echo "participant reports: ${reports[*]:0:3} ..."
echo "group report:        $OUT/derivatives/group/report.html"
