#!/usr/bin/env bash
# The paper's six claims over three seed pairs, and the non-IID claims over three partition seeds,
# offline on the default data (MNIST-5k):
#   bash scripts/paper_tables.sh [OUT]      (default outputs/paper; about 80 minutes on 2 cores)
# Seven sweeps, one folder each under OUT, then `tfuse paper OUT` writes OUT/report.md (claims
# table, finetuning curves, selection on validation), claims.csv, finetune.png and reg.png.
# Parents are trained once into the cache (outputs/parents) and shared by every sweep. A finished
# sweep is kept and skipped when the script runs again; an unfinished one is moved aside to
# OUT/NAME.partial-TIME (never deleted) and run afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/paper}
TFUSE=${TFUSE:-.venv/bin/tfuse}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PAIRS='parent_seeds=[0,1],[2,3],[4,5]'
mkdir -p "$OUT"

sweep() {  # NAME OVERRIDES...: one Hydra multirun into OUT/NAME
  local name=$1 dir="$OUT/$1"
  shift
  if [[ -e "$dir/.complete" ]]; then
    echo "paper_tables: $dir is complete; kept"
    return
  fi
  if [[ -e "$dir" ]]; then
    mv "$dir" "$dir.partial-$(date +%Y%m%d-%H%M%S)"
  fi
  echo "paper_tables: $name: tfuse fuse -m $*"
  local start=$SECONDS
  "$TFUSE" fuse -m "$@" hydra.sweep.dir="$dir"
  echo "$((SECONDS - start))" > "$dir/.complete"
}

# (a) repaired, (d): the experiment as configured, finetuned with the parents as controls,
# without and with distillation from the parents' ensemble
sweep main +experiment=vit_mnist "$PAIRS" finetune.teacher=none,ensemble
# (a) as in the paper, (b) hard, (c): alignment alone, no repair
sweep hard +experiment=vit_mnist "$PAIRS" finetune.steps=0 fusion.repair=none fusion.cost=activations,weights
# (b) soft: the reg ablation (Sinkhorn over reg, both costs); the claim takes the reg with the
# best mean validation score. With the residual ablation: selection on validation vs on test.
sweep reg +experiment=vit_mnist +ablation=reg fusion.repair=none
sweep residual +experiment=vit_mnist +ablation=residual fusion.repair=none
# (e) compression: width 128 into 64 against the small parent finetuned alike
sweep hetero +experiment=vit_hetero "$PAIRS"
# (f) three parents per run, three disjoint triples
sweep n3 +experiment=vit_mnist 'parent_seeds=[0,1,2],[3,4,5],[6,7,8]' finetune.steps=0
# (g) parents that know different things: label-skewed shards, three partition seeds, one-shot
# against the parents and their ensemble, then the finetune on the fuser's 1,000 samples
sweep noniid +experiment=vit_mnist_skew partition.seed=0,1,2

"$TFUSE" paper "$OUT"
