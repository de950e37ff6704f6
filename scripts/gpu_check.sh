#!/usr/bin/env bash
# device=cuda checked on a GPU: the GPU and the versions, tests/test_gpu.py, then
# scripts/bench_fuse.py --device cuda on the vit and the vitb (ViT-B/16) cases (about 8 minutes),
# on TinyLlama-1.1B in bfloat16 streamed (about 3); with GPU_CHECK_8B=1 also on Llama-3-8B shapes
# in bfloat16 (16 GB a parent: its pair built first in a step of its own, then fused with the
# lstsq repair on 256 sequences of 2,048 tokens; up to 13 minutes more).
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else outputs/gpu_check
#   GPU_CHECK_8B=1 bash scripts/gpu_check.sh # and the 8B case
#
# OUT_DIR gets 12 files: summary.txt (each step's exit status and seconds), env.txt, test_gpu.log,
# pair_llama3_8b.log, bench_NAME.log for NAME in vit, vitb, tinyllama, llama3_8b (a bench cut short
# by its limit keeps the lines it printed) and bench_NAME.json (the JSON line of a bench that
# finished). Every step has its own time limit and the next one runs regardless; the exit status
# is the first failing step's.
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
    # Limits sized for an H200 (about 8 minutes for the first three steps); the benches' defaults otherwise
    # (vit: 200 samples, vitb: 1,000; --large 2000; lstsq repair on --samples repair samples).
    step test_gpu 150 "$PY" -m pytest -q -o addopts= -rfEs tests/test_gpu.py
    bench bench_vit 130 --case vit --repeats 2
    bench bench_vitb 170 --case vitb --repeats 1
    # Scale cases (scripts/scale_cases.py): 32 sequences of 128 tokens by default, pairs in outputs/scale
    bench bench_tinyllama 200 --case tinyllama-1.1b --dtype bfloat16 --only fuse,memory
    if [ "${GPU_CHECK_8B:-0}" = 1 ]; then  # beyond a 15-minute device budget: asked for by name
        step pair_llama3_8b 400 "$PY" "$ROOT/scripts/scale_cases.py" llama3-8b "$ROOT/outputs/scale/llama3-8b-bfloat16" --dtype bfloat16
        bench bench_llama3_8b 400 --case llama3-8b --samples 256 --tokens 2048 --repair lstsq --dtype bfloat16
    fi
    echo "total $SECONDS s; outputs in $DIR" | tee -a "$DIR/summary.txt"
    return "$STATUS"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
