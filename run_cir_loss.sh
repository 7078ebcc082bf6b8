#!/usr/bin/env bash
# Circle-Loss experiments with LoRA (r 32, alpha 64) on multilingual SigLIP: the five strategies, non-interactive.
set -euo pipefail
cd "$(dirname "$0")"
exec ./scripts/run_strategies.sh --lora "$@"
