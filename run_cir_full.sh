#!/usr/bin/env bash
# Circle-Loss experiments with full fine-tuning of multilingual SigLIP: the five strategies as one Hydra multirun
# (./run_cir_full.sh --help; the body is scripts/run_strategies.sh).
set -euo pipefail
cd "$(dirname "$0")"
exec ./scripts/run_strategies.sh --full "$@"
