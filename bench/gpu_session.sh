#!/usr/bin/env bash
# One GPU session for the three benchmarks, each under a time limit so partial results survive.
#   bench/gpu_session.sh                 # all three
#   bench/gpu_session.sh strategies      # only the named ones (train_throughput, eval_metrics, strategies)
# Run from the repository root on a CUDA machine whose python3 has torch, transformers, lightning and peft;
# hydra-core / omegaconf / prettytable may come as wheels in .whl/. Tables land in bench/results_gpu/ (and $OUT).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
out=bench/results_gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, lightning, peft; print(torch.__version__, transformers.__version__, lightning.__version__, peft.__version__)"
sections="$*"
wanted() { [ -z "$sections" ] || [[ " $sections " == *" $1 "* ]]; }
if wanted train_throughput; then
    echo "== train_throughput"
    timeout 160 python3 -m bench.train_throughput --out "$out" 2>&1 | grep -v -i warn | tail -8
fi
if wanted eval_metrics; then
    echo "== eval_metrics"
    timeout 110 python3 -m bench.eval_metrics --device cuda --out "$out" 2>&1 | tail -12
fi
if wanted strategies; then
    echo "== strategies"
    timeout "${STRATEGIES_TIMEOUT:-260}" python3 -m bench.strategies --out "$out" --set hydra/launcher=local --set dataset.num_workers=2 \
        2>&1 | tail -12
fi
if [ -n "${OUT:-}" ]; then cp "$out"/*.md "$out"/*.json "$OUT"/ 2>/dev/null; fi
