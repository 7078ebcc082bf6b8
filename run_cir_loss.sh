#!/usr/bin/env bash
# Circle-Loss experiments with LoRA (r 32, alpha 64) on multilingual SigLIP: the five strategies as one Hydra
# multirun (./run_cir_loss.sh --help; the body is scripts/run_strategies.sh).
set -euo pipefail
cd "$(dirname "$0")"
exec ./scripts/run_strategies.sh --lora "$@"
