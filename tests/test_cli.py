"""`trainer.py` on bad input: one clear message, exit status 2, no traceback and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import demo_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset_root_dir={missing}", "does not exist"),
        # The same exit path; the message itself is tested in-process (test_bad_input.py, case 11).
        pytest.param("ckpt_path={missing}/last.ckpt", "ckpt_path=", marks=pytest.mark.slow),
    ],
)
def test_bad_input_exits_with_status_2_and_one_message(demo_root, tmp_path, override, message):
    missing = tmp_path / "nowhere"
    overrides = [*demo_overrides(demo_root), override.format(missing=missing)]
    run_dir = tmp_path / "run"
    command = [sys.executable, "trainer.py", "-cn", "demo", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert message in output and "Traceback" not in output, output[-3000:]
    assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints").exists()
