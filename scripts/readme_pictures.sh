#!/usr/bin/env bash
# Regenerate the pictures shown in the README from the embedded demo (nothing is drawn by hand):
# trains the demo, then indexes its test gallery and draws one query's results.
#   ./scripts/readme_pictures.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-outputs/readme_pictures}"
[ -f "$run/results.json" ] || uv run trainer.py -cn demo logger=csv "hydra.run.dir=$run"
mkdir -p docs/images
cp "$run/failures.png" docs/images/failures.png
cp "$run/similarity_test.png" docs/images/similarity_test.png
gallery="$run/gallery"
rm -rf "$gallery" && mkdir -p "$gallery"
# The demo's test split only: identities the model never saw in training.
uv run python - "$gallery" <<'PY'
import shutil, sys
from pathlib import Path
from data.readers import read_dataset
out = Path(sys.argv[1])
for path in read_dataset("VN3K_VI", "demo_assets").test.image_paths:
    target = out / path.parent.name / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)
PY
uv run search.py index "$gallery" --model "$run/checkpoints/last.ckpt" --index "$run/index"
uv run search.py query --index "$run/index" -k 6 --grid docs/images/query_grid.png \
    "Một người phụ nữ mặc áo khoác hồng và quần dài màu xanh lá cây" \
    "a woman in a blue t-shirt and black jeans with red shoes, a yellow helmet and a pink handbag"
