"""The training-throughput benchmark's report: the card's peak, the table and the compiled-vs-eager comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from utils.io import atomic_write_json, atomic_write_text

#: Dense bf16 tensor-core peak (no sparsity) by device-name fragment, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "A100": 312.0, "RTX 3060": 51.2}


def peak_tflops(device: str) -> float | None:
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS.items() if fragment in device), None)


@dataclass
class Report:
    device: str
    header: str
    rows: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def write(self, out: Path, tag: str) -> None:
        lines = [
            self.header,
            "",
            "| variant | batch | trainable | samples/s | vs before | peak GiB | ckpt | TFLOP/s | MFU | bare samples/s "
            "| Lightning/bare | max rel. loss diff vs eager |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row['variant']} | {row['batch']} | {row['trainable']:,} | {row['samples_per_s']:.1f} | "
                f"{fmt(row.get('speedup'), '{:.2f}x')} | {row['peak_gib']:.2f} | "
                f"{'on' if row['checkpointing'] else 'off'} | {fmt(row.get('tflops'), '{:.0f}')} | "
                f"{fmt(row.get('mfu'), '{:.1%}')} | "
                f"{fmt(row.get('bare_samples_per_s'), '{:.1f}')} | {fmt(row.get('ratio'), '{:.3f}')} | "
                f"{fmt(row.get('loss_rel_diff'), '{:.1e}')} |"
            )
        lines += [f"- failed: {failure}" for failure in self.failures]
        atomic_write_text(out / f"train_throughput_{tag}.md", "\n".join(lines) + "\n")
        atomic_write_json(
            out / f"train_throughput_{tag}.json", {"device": self.device, "rows": self.rows, "failures": self.failures}
        )


def fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def compare_with_eager_twin(row: dict, done: dict) -> None:
    """Largest relative difference of the per-step total losses from the eager twin (compiled vs eager)."""
    twin = done.get(row["eager_twin"]) if row.get("eager_twin") else None
    if twin:
        row["loss_rel_diff"] = max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], twin["losses"]) if math.isfinite(b)
        )
