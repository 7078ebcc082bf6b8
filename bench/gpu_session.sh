#!/usr/bin/env bash
# One GPU session for the benchmarks, each under a time limit so partial results survive (each writes its table after
# every row).
#   bench/gpu_session.sh                                  # what is not yet measured on a GPU ($NEXT), about 9 min
#   bench/gpu_session.sh all                              # every section (more than one 10-minute call)
#   bench/gpu_session.sh train_throughput eval_metrics    # only the named ones
#   TRAIN_ARGS="--variants full:before lora:all" bench/gpu_session.sh train_throughput   # arguments of that bench
# Sections: train_throughput (speed and memory levers, MFU), train_profile (GPU busy fraction, launches, top kernels
# and host operators), data_throughput (workers needed to feed the measured rate,
# on this machine's CPUs), eval_metrics (ranking on the GPU), strategies (the five strategies' losses).
# Run from the repository root on a CUDA machine whose python3 has torch, transformers, lightning and peft;
# hydra-core, omegaconf, prettytable and bitsandbytes may come as wheels in .whl/. Tables land in bench/results_gpu/
# (and $OUT when set).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
out=bench/results_gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, lightning, peft; print(torch.__version__, transformers.__version__, lightning.__version__, peft.__version__)"
# Not yet measured: where a step's time goes, and the speed of the current defaults (training reads the GPU only at
# logging steps) and of CUDA graphs / kernel tuning, each with its baseline and eager twin in the same run.
NEXT="train_profile train_throughput"
NEXT_TRAIN_ARGS="--variants full:before full:all full:all+cudagraphs full:all-eager lora:before lora:all \
lora:all+cudagraphs lora:all-eager lora:all+autotune"
sections="${*:-$NEXT}"
if [ -z "$*" ]; then TRAIN_ARGS="${TRAIN_ARGS:-$NEXT_TRAIN_ARGS}"; fi
wanted() { [ "$sections" = all ] || [[ " $sections " == *" $1 "* ]]; }
copy_out() { if [ -n "${OUT:-}" ]; then cp "$out"/*.md "$out"/*.json "$OUT"/ 2>/dev/null; fi; }
if wanted train_profile; then
    echo "== train_profile"
    timeout "${PROFILE_TIMEOUT:-120}" python3 -m bench.train_profile --out "$out" ${PROFILE_ARGS:-} 2>&1 | grep -v -i warn | tail -60
    copy_out
fi
if wanted train_throughput; then
    echo "== train_throughput"
    # The progress bar's updates (carriage returns) become lines and are dropped with the other noise.
    timeout "${TRAIN_TIMEOUT:-420}" python3 -m bench.train_throughput --out "$out" ${TRAIN_ARGS:-} 2>&1 | tr '\r' '\n' \
        | grep -v -i -E 'warn|^\s*$|LOCAL_RANK|GPU available|TPU available|HPU available|it/s\]|s/it\]' | tail -40
    copy_out
fi
if wanted data_throughput; then
    echo "== data_throughput"
    timeout "${DATA_TIMEOUT:-60}" python3 -m bench.data_throughput --images 200 --workers 1 4 8 --out "$out" --tag gpu_host 2>&1 | tail -12
    copy_out
fi
if wanted eval_metrics; then
    echo "== eval_metrics"
    timeout "${EVAL_TIMEOUT:-90}" python3 -m bench.eval_metrics --device cuda --out "$out" 2>&1 | tail -14
    copy_out
fi
if wanted strategies; then
    echo "== strategies"
    timeout "${STRATEGIES_TIMEOUT:-260}" python3 -m bench.strategies --out "$out" --set hydra/launcher=local --set dataset.num_workers=2 \
        2>&1 | tail -12
    copy_out
fi
