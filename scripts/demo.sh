#!/usr/bin/env bash
# The demo: synthesise a ds005917-shaped dataset, run the participant level for every
# subject (dmn4), then the group level (prediction suite and ketamine-vs-placebo treatment
# selection), and print where the reports are.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-demo_out}
rm -rf "$OUT"
"$PY" -m bids_ketdcm.cli.app synth "$OUT/bids" --network dmn4 --link planted --seed 0
"$PY" run.py "$OUT/bids" "$OUT/derivatives" participant --network dmn4
"$PY" run.py "$OUT/bids" "$OUT/derivatives" group --include-group MDD --n-permutations 200 --nested-repeats 2 \
    --nested-permutations 50 --allow-missing --treatment-selection --treatment-repeats 2
reports=("$OUT"/derivatives/sub-*.html)
echo "participant reports: ${reports[*]:0:3} ..."
echo "group report:        $OUT/derivatives/group/report.html"
