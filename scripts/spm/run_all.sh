#!/bin/sh
# Regenerate SPM12's numbers for the real-data reference cases under GNU Octave.
# Usage: scripts/spm/run_all.sh SPM12_DIR CASE_DIR [CASE_DIR ...]
# Each CASE_DIR holds ts.txt and source.txt (TR) from scripts/spm/make_real_cases.py.
# SPM_FEATURES_ONLY=1: only SPM's data features (spm_features.m: csd_data.txt, Hz.txt; seconds),
# not the inversion (run_spm_csd.m: minutes to hours). SPM_MAXIT=k caps SPM's iterations (default 128),
# for a timing run of a large model.
# OpenBLAS's thread count is fixed (SPM_BLAS_THREADS, default 2): spm_svd's basis of pC's degenerate
# eigenspaces depends on it, and run_spm_csd.m records the basis it got.
set -eu
spm_dir=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
threads=${SPM_BLAS_THREADS:-2}
maxit=${SPM_MAXIT:-128}
for case_dir in "$@"; do
    tr=$(awk '/^TR/ {print $2}' "$case_dir/source.txt")
    if [ "${SPM_FEATURES_ONLY:-0}" = 1 ]; then call="spm_features('$case_dir/ts.txt', $tr, '$case_dir')"
    else call="run_spm_csd('$case_dir/ts.txt', $tr, '$case_dir', $maxit)"; fi
    OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads octave --no-gui --quiet --eval \
        "addpath('$spm_dir'); addpath('$here'); $call"
done
