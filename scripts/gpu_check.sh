#!/usr/bin/env bash
# device=cuda checked on a GPU in about 8 minutes: the GPU and the versions, tests/test_gpu.py,
# then scripts/bench_fuse.py --device cuda on the vit and the vitb (ViT-B/16) cases.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else outputs/gpu_check
#
# OUT_DIR gets 7 files: summary.txt (each step's exit status and seconds), env.txt, test_gpu.log,
# bench_vit.log and bench_vitb.log (a bench cut short by its limit keeps the lines it printed),
# bench_vit.json and bench_vitb.json (the JSON line of a bench that finished). Every step has its
# own time limit and the next one runs regardless; the exit status is the first failing step's.
# PYTHON overrides the interpreter (default: the repository's .venv/bin/python).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
STATUS=0

step() {  # step NAME LIMIT_S COMMAND...: output in $DIR/NAME.log, status and seconds in summary.txt
    local name=$1 limit=$2 start=$SECONDS rc note=""
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    case $rc in 124 | 137) note=" (time limit)" ;; esac
    echo "$name: exit $rc$note after $((SECONDS - start)) s (limit $limit s)" | tee -a "$DIR/summary.txt"
    if [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$rc; fi
    return "$rc"
}

bench() {  # bench NAME LIMIT_S ARGS...: bench_fuse.py on the GPU, its JSON line in $DIR/NAME.json
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" "$ROOT/scripts/bench_fuse.py" --device cuda "$@" &&
        tail -n 1 "$DIR/$name.log" >"$DIR/$name.json"
}

main() {
    DIR=${1:-${OUT:-$ROOT/outputs/gpu_check}}
    mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd) || return 1
    : >"$DIR/summary.txt"
    cd "$ROOT" || return 1
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    {
        nvidia-smi -L
        "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, GPU visible to torch: {torch.cuda.is_available()}")'
    } >"$DIR/env.txt" 2>&1
    cat "$DIR/env.txt"
    if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "no CUDA GPU visible to torch: nothing to check" | tee -a "$DIR/summary.txt"
        return 1
    fi
    # Limits sized for an H200 (about 8 minutes in all); the benches' defaults otherwise
    # (vit: 200 samples, vitb: 1,000; --large 2000; lstsq repair on --samples repair samples).
    step test_gpu 150 "$PY" -m pytest -q -o addopts= -rfEs tests/test_gpu.py
    bench bench_vit 130 --case vit --repeats 2
    bench bench_vitb 170 --case vitb --repeats 1
    echo "total $SECONDS s; outputs in $DIR" | tee -a "$DIR/summary.txt"
    return "$STATUS"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
