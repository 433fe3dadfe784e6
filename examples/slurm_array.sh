#!/usr/bin/env bash
# bids-ketdcm on a Slurm cluster with Apptainer (or SingularityCE): one array task per
# participant, then one group job that starts when every participant task succeeded.
#
# Run it on a login node; it submits itself:
#
#   bash examples/slurm_array.sh BIDS_DIR OUTPUT_DIR [PARTICIPANT_OPTION ...] [-- GROUP_OPTION ...]
#
#   bash examples/slurm_array.sh /data/ds005917 /scratch/$USER/ketdcm \
#       --network dmn4 --network ket21 -- --n-permutations 1000
#   GPU=1 bash examples/slurm_array.sh /data/ds005917 /scratch/$USER/ketdcm   # GPU partition
#
# What it does:
#   1. builds the Apptainer image SIF from the Docker image (once; skipped when SIF exists);
#   2. lists the participants of BIDS_DIR/participants.tsv that have fMRIPrep outputs, one per
#      line, in OUTPUT_DIR/logs/slurm/participants.txt (array task i takes line i);
#   3. submits the participant array (`sbatch --array=1-N%MAX_PARALLEL`);
#   4. submits the group job with `--dependency=afterok:ARRAY_JOB_ID`.
#
# Resuming: the app skips runs whose outputs exist (unless --overwrite), so running this
# script again with the same arguments redoes only what is missing; finished participants
# take seconds. To resubmit only the failed tasks, set TASKS (see the README, "HPC").
#
# Settings (environment variables, all optional):
#   GPU=1            participant tasks on a GPU: CUDA image, GPU_PARTITION, --gres=gpu:1,
#                    `apptainer run --nv`, `--device cuda` (fails loudly if no GPU is seen,
#                    where `--device auto` would quietly fall back to the CPU)
#   GPU_PARTITION    partition of the GPU nodes (default: gpu)
#   PARTITION        partition of the CPU jobs (default: the cluster's default)
#   ACCOUNT          account to charge (sbatch --account)
#   CPUS, MEM, TIME  resources of one participant task (default: 4, 16G, 04:00:00)
#   GROUP_CPUS, GROUP_MEM, GROUP_TIME   of the group job (default: 16, 32G, 24:00:00)
#   MAX_PARALLEL     participant tasks running at once (default: 50)
#   PER_TASK         participants per array task (default: 1; on a GPU, 8 or more share
#                    one batched inversion)
#   TASKS            array indices to submit, e.g. 3,17 (default: all)
#   NO_GROUP=1       submit the participant array only
#   FMRIPREP_DIR     fMRIPrep derivatives (default: BIDS_DIR/derivatives/fmriprep if it
#                    exists, else BIDS_DIR itself)
#   IMAGE            image to build from (default: docker://ghcr.io/bids-ketdcm/bids-ketdcm:
#                    VERSION, with -cuda under GPU=1); docker-daemon://bids-ketdcm:latest
#                    takes a locally built one
#   VERSION          bids-ketdcm version (default: 0.1.0)
#   SCRATCH_ROOT     scratch folder for the image, its build cache and the work folders
#                    (default: $SCRATCH/bids-ketdcm, or /scratch/$USER/bids-ketdcm)
#   SIF              the image file (default: SCRATCH_ROOT/images/bids-ketdcm-VERSION[-cuda].sif)
#   WORK_ROOT        per-task work folders (pybids index, the container's /tmp with every
#                    cache); default SCRATCH_ROOT/work. A node-local disk (e.g. $TMPDIR)
#                    is faster. A task's folder is deleted when the task succeeds and kept
#                    for inspection when it fails.
#
# Paths in the options (--network FILE.tsv, --bids-filter-file, --save-model, ...) must be
# under BIDS_DIR, OUTPUT_DIR or FMRIPREP_DIR, which are mounted at the same paths inside the
# container, or listed in APPTAINER_BIND.
#
# Site-wide sbatch defaults for both jobs may go here (remove one '#' to enable them):
##SBATCH --account=myproject
##SBATCH --qos=normal
# The GPU variant by hand (GPU=1 adds these to the participant array only):
##SBATCH --partition=gpu
##SBATCH --gres=gpu:1

set -euo pipefail

VERSION=${VERSION:-0.1.0}
GPU=${GPU:-0}
if [[ $GPU == 1 ]]; then SUFFIX=-cuda; else SUFFIX=; fi
IMAGE=${IMAGE:-docker://ghcr.io/bids-ketdcm/bids-ketdcm:${VERSION}${SUFFIX}}
SCRATCH_ROOT=${SCRATCH_ROOT:-${SCRATCH:-/scratch/${USER:-$(id -un)}}/bids-ketdcm}
SIF=${SIF:-$SCRATCH_ROOT/images/bids-ketdcm-${VERSION}${SUFFIX}.sif}
WORK_ROOT=${WORK_ROOT:-$SCRATCH_ROOT/work}

die() {
    echo "slurm_array.sh: $*" >&2
    exit 2
}

# apptainer, or singularity where the site still calls it that; its environment prefix.
container_runtime() {
    if command -v apptainer >/dev/null 2>&1; then
        RUNTIME=apptainer ENV_PREFIX=APPTAINERENV_
    elif command -v singularity >/dev/null 2>&1; then
        RUNTIME=singularity ENV_PREFIX=SINGULARITYENV_
    else
        die "neither apptainer nor singularity is on PATH (try: module load apptainer)"
    fi
}

# Folder of fMRIPrep outputs, as the app finds it.
fmriprep_dir() {
    if [[ -n ${FMRIPREP_DIR:-} ]]; then
        echo "$FMRIPREP_DIR"
    elif [[ -d $1/derivatives/fmriprep ]]; then
        echo "$1/derivatives/fmriprep"
    else
        echo "$1"
    fi
}

# run_app TASK_DIR APP_ARGUMENT ...: the image's entry point (bids-ketdcm) with BIDS_DIR
# read-only, OUTPUT_DIR and TASK_DIR writable at their own paths, TASK_DIR/tmp as /tmp
# (HOME and every cache of the image live there), nothing else of the host.
run_app() {
    local task_dir=$1 cpus=${SLURM_CPUS_PER_TASK:-1}
    shift
    mkdir -p "$task_dir/tmp" "$task_dir/work"
    local -a flags=(--cleanenv --containall --pwd /tmp
        --bind "$BIDS_DIR:$BIDS_DIR:ro" --bind "$OUTPUT_DIR:$OUTPUT_DIR"
        --bind "$task_dir:$task_dir" --bind "$task_dir/tmp:/tmp")
    case $FMRIPREP/ in
        "$BIDS_DIR"/*) ;;
        *) flags+=(--bind "$FMRIPREP:$FMRIPREP:ro") ;;
    esac
    if [[ $GPU == 1 ]]; then flags+=(--nv); fi
    # --cleanenv drops the host's environment; these reach the container (numpy/torch threads).
    export "${ENV_PREFIX}OMP_NUM_THREADS=$cpus" "${ENV_PREFIX}OPENBLAS_NUM_THREADS=$cpus" \
        "${ENV_PREFIX}MKL_NUM_THREADS=$cpus"
    printf '+'
    printf ' %q' "$RUNTIME" run "${flags[@]}" "$SIF" "$@"
    echo
    "$RUNTIME" run "${flags[@]}" "$SIF" "$@"
}

# ---------------------------------------------------------------- inside the jobs

# participant task: its line(s) of the list, then the participant level on them.
participant_task() {
    local list=$OUTPUT_DIR/logs/slurm/participants.txt per_task=${PER_TASK:-1}
    local task=${SLURM_ARRAY_TASK_ID:?not in a Slurm array task}
    local first=$(((task - 1) * per_task + 1))
    local -a labels=()
    mapfile -t labels < <(sed -n "${first},$((first + per_task - 1))p" "$list")
    [[ ${#labels[@]} -gt 0 ]] || die "task $task: no line $first in $list"
    local -a args=("$BIDS_DIR" "$OUTPUT_DIR" participant --nprocs "${SLURM_CPUS_PER_TASK:-1}")
    local label
    for label in "${labels[@]}"; do args+=(--participant-label "$label"); done
    args+=(--fmriprep-dir "$FMRIPREP")
    if [[ $GPU == 1 ]]; then args+=(--device cuda); else args+=(--device cpu); fi
    local task_dir=$WORK_ROOT/${SLURM_ARRAY_JOB_ID:?}_$task
    echo "$(date -Is) task $task on $(hostname): ${labels[*]}"
    local status=0
    run_app "$task_dir" "${args[@]}" --work-dir "$task_dir/work" "$@" || status=$?
    if [[ $status -eq 0 ]]; then
        rm -rf "$task_dir"
    else
        echo "$(date -Is) failed (exit $status); work folder kept: $task_dir" >&2
    fi
    return "$status"
}

group_job() {
    local task_dir=$WORK_ROOT/${SLURM_JOB_ID:?not in a Slurm job}_group status=0
    echo "$(date -Is) group level on $(hostname)"
    run_app "$task_dir" "$BIDS_DIR" "$OUTPUT_DIR" group --nprocs "${SLURM_CPUS_PER_TASK:-1}" "$@" || status=$?
    if [[ $status -eq 0 ]]; then rm -rf "$task_dir"; fi
    return "$status"
}

# ---------------------------------------------------------------- on the login node

# Participants of participants.tsv (labels without "sub-"), in file order.
participants() {
    awk -F'\t' '
        { sub(/\r$/, "") }
        NR == 1 { for (i = 1; i <= NF; i++) if ($i == "participant_id") col = i
                  if (!col) { print "no participant_id column" > "/dev/stderr"; exit 3 }
                  next }
        $col != "" { label = $col; sub(/^sub-/, "", label); print label }
    ' "$1"
}

submit() {
    [[ -f $BIDS_DIR/participants.tsv ]] || die "$BIDS_DIR/participants.tsv not found"
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a Slurm login node"
    local logs=$OUTPUT_DIR/logs/slurm
    mkdir -p "$logs" "$WORK_ROOT" "$(dirname "$SIF")"

    if [[ ! -s $SIF ]]; then
        # The build unpacks every layer: cache and temporary files on scratch, not in $HOME or /tmp.
        export APPTAINER_CACHEDIR=${APPTAINER_CACHEDIR:-$SCRATCH_ROOT/cache}
        export APPTAINER_TMPDIR=${APPTAINER_TMPDIR:-$SCRATCH_ROOT/build-tmp}
        export SINGULARITY_CACHEDIR=$APPTAINER_CACHEDIR SINGULARITY_TMPDIR=$APPTAINER_TMPDIR
        mkdir -p "$APPTAINER_CACHEDIR" "$APPTAINER_TMPDIR"
        echo "building $SIF from $IMAGE"
        "$RUNTIME" build "$SIF.partial" "$IMAGE"
        mv "$SIF.partial" "$SIF"
    fi
    "$RUNTIME" run --cleanenv --containall "$SIF" --version

    local list=$logs/participants.txt all kept=0 missing=()
    all=$(participants "$BIDS_DIR/participants.tsv")
    : >"$list.partial"
    local label
    while IFS= read -r label; do
        [[ -n $label ]] || continue
        if [[ -d $FMRIPREP/sub-$label ]]; then
            echo "$label" >>"$list.partial"
            kept=$((kept + 1))
        else
            missing+=("$label")
        fi
    done <<<"$all"
    mv "$list.partial" "$list"
    [[ $kept -gt 0 ]] || die "no participant of participants.tsv has a folder in $FMRIPREP"
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "warning: no fMRIPrep outputs, left out: ${missing[*]}" >&2
        echo "warning: the group level stops on labelled participants without derivatives" \
            "unless given --allow-missing" >&2
    fi

    local per_task=${PER_TASK:-1}
    local n_tasks=$(((kept + per_task - 1) / per_task))
    local array=${TASKS:-1-$n_tasks}%${MAX_PARALLEL:-50}
    local -a common=(--parsable --export=ALL)
    if [[ -n ${ACCOUNT:-} ]]; then common+=(--account "$ACCOUNT"); fi
    local -a resources=(--cpus-per-task "${CPUS:-4}" --mem "${MEM:-16G}" --time "${TIME:-04:00:00}")
    if [[ $GPU == 1 ]]; then
        resources+=(--partition "${GPU_PARTITION:-gpu}" --gres gpu:1)
    elif [[ -n ${PARTITION:-} ]]; then
        resources+=(--partition "$PARTITION")
    fi
    export KETDCM_SIF=$SIF KETDCM_FMRIPREP=$FMRIPREP GPU PER_TASK=$per_task WORK_ROOT

    local array_id
    array_id=$(sbatch "${common[@]}" "${resources[@]}" --job-name ketdcm-participant --array "$array" \
        --output "$logs/participant-%A_%a.log" "$SELF" __participant "$BIDS_DIR" "$OUTPUT_DIR" \
        ${PARTICIPANT_OPTIONS[@]+"${PARTICIPANT_OPTIONS[@]}"})
    array_id=${array_id%%;*}
    echo "participant array: job $array_id, tasks $array ($kept participants, $per_task per task)"
    echo "  logs: $logs/participant-${array_id}_<task>.log"

    if [[ ${NO_GROUP:-0} == 1 ]]; then return; fi
    local -a group_resources=(--cpus-per-task "${GROUP_CPUS:-16}" --mem "${GROUP_MEM:-32G}"
        --time "${GROUP_TIME:-24:00:00}")
    if [[ -n ${PARTITION:-} ]]; then group_resources+=(--partition "$PARTITION"); fi
    local group_id
    group_id=$(sbatch "${common[@]}" "${group_resources[@]}" --job-name ketdcm-group \
        --dependency "afterok:$array_id" --kill-on-invalid-dep=yes \
        --output "$logs/group-%j.log" "$SELF" __group "$BIDS_DIR" "$OUTPUT_DIR" ${GROUP_OPTIONS[@]+"${GROUP_OPTIONS[@]}"})
    group_id=${group_id%%;*}
    echo "group job: $group_id, starts when every task of $array_id succeeded (cancelled if one fails)"
    echo "  log: $logs/group-${group_id}.log"
}

# ---------------------------------------------------------------- main

MODE=submit
case ${1:-} in
    __participant | __group) MODE=$1 && shift ;;
    -h | --help | "") sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) ;;
esac
[[ $# -ge 2 ]] || die "usage: bash examples/slurm_array.sh BIDS_DIR OUTPUT_DIR [OPTION ...] [-- GROUP_OPTION ...]"
container_runtime

if [[ $MODE == submit ]]; then
    SELF=$(realpath "$0")
    BIDS_DIR=$(realpath "$1")
    mkdir -p "$2"
    OUTPUT_DIR=$(realpath "$2")
    shift 2
    FMRIPREP=$(realpath "$(fmriprep_dir "$BIDS_DIR")")
    PARTICIPANT_OPTIONS=()
    GROUP_OPTIONS=()
    while [[ $# -gt 0 && $1 != -- ]]; do PARTICIPANT_OPTIONS+=("$1") && shift; done
    if [[ $# -gt 0 ]]; then shift && GROUP_OPTIONS=("$@"); fi
    submit
else
    BIDS_DIR=$1 OUTPUT_DIR=$2
    shift 2
    SIF=${KETDCM_SIF:-$SIF}
    FMRIPREP=${KETDCM_FMRIPREP:-$(fmriprep_dir "$BIDS_DIR")}
    if [[ $MODE == __participant ]]; then participant_task "$@"; else group_job "$@"; fi
fi
