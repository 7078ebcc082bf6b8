#!/usr/bin/env bash
# Circle-Loss experiments with full fine-tuning of multilingual SigLIP: the five strategies, non-interactive.
set -euo pipefail
cd "$(dirname "$0")"
exec ./scripts/run_strategies.sh --full "$@"
