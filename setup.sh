#!/usr/bin/env bash
# One-time setup: uv, the locked environment, the multilingual checkpoint, and a report on the datasets.
#   ./setup.sh [DATA_ROOT]      (default: $TBPS_DATA_ROOT or the repository folder)
# Missing datasets are reported, not fatal: each is optional. A malformed one makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")"
data_root="${1:-${TBPS_DATA_ROOT:-.}}"

if ! command -v uv >/dev/null 2>&1; then
    echo "Installing uv ..."
    python3 -m pip install --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
    export PATH="$HOME/.local/bin:$PATH"
fi
export UV_COMPILE_BYTECODE=1
uv sync --locked

if [ -f m_siglip_checkpoints/model.safetensors ]; then
    echo "Checkpoint: m_siglip_checkpoints/ present."
elif ! uv run prepare_checkpoints.py; then
    echo "Checkpoint: download failed (no access to the Hugging Face hub?). Copy the folder by hand, or use the"
    echo "embedded default: uv run trainer.py -cn demo"
fi

echo "Datasets under $data_root (folder layouts: README, 'Real datasets'):"
uv run python -m data.check --root "$data_root"
