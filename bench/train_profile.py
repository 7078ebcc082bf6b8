"""Where a training step's time goes: GPU busy fraction, kernel launches, and the top kernels and CPU operators.

    uv run python -m bench.train_profile                         # CUDA: lora:all and full:all at batch 24
    uv run python -m bench.train_profile --variants lora:all-eager --steps 5
    uv run python -m bench.train_profile --small                 # CPU-sized shapes (a smoke run of the tool)

Trains the variants of `bench.train_throughput` (same model, recipe, synthetic batches and levers) with a plain loop,
first unprofiled (the host's time to queue a step, until the step's call returns, against the wall time per step:
equal when the GPU waits on the host), then under `torch.profiler`, and reports per step: wall time, the time GPU
kernels ran (their durations summed: one stream, so they do not overlap), the busy fraction (kernel time / wall time;
far below 1 means the GPU waits on the host), kernel launches, and the ten kernels and ten host operators that took
longest. At batch 24 the seed recipe runs at 10 to 14 % of an H200's dense bf16 peak: this says whether launches,
the host's Python or the kernels themselves are the reason. Results: bench/results/train_profile_<device>.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.train_setup import (
    ROOT,
    BatchPool,
    bare_setup,
    bare_step,
    bench_setting,
    make_config,
    sync,
    write_backbone,
)
from bench.train_throughput import all_variants
from config_schema import register_schema
from utils.io import atomic_write_text

TOP = 10


def profile_variant(cfg, pool: BatchPool, warmup: int) -> dict:
    """Warm up (compilation happens here), then profile the remaining steps of `pool`."""
    model, objective, optimizer, autocast = bare_setup(cfg)
    for step in range(warmup):
        bare_step(model, objective, optimizer, autocast, pool[step])
    sync()
    # Unprofiled: how long the host takes to queue a step (until bare_step returns, no synchronisation) against the
    # wall time per step. Equal means the GPU waits on the host; far below means the host waits on the GPU.
    queued, start = [], time.perf_counter()
    for step in range(warmup, len(pool)):
        begin = time.perf_counter()
        bare_step(model, objective, optimizer, autocast, pool[step])
        queued.append(time.perf_counter() - begin)
    sync()
    unprofiled_wall = (time.perf_counter() - start) / len(queued)
    cuda = next(model.parameters()).is_cuda
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    steps = len(pool) - warmup
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for step in range(warmup, len(pool)):
            bare_step(model, objective, optimizer, autocast, pool[step])
        sync()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    operators = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
    return {
        "host_ms": 1e3 * sum(queued) / len(queued),
        "unprofiled_wall_ms": 1e3 * unprofiled_wall,
        "wall_ms": 1e3 * wall,
        "kernel_ms": kernel_us / 1e3 / steps,
        "busy": kernel_us / 1e6 / steps / wall if cuda else None,
        "launches": sum(e.count for e in kernels) / steps,
        "top_kernels": [
            (e.key, e.self_device_time_total / 1e3 / steps, e.count / steps)
            for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:TOP]
        ],
        "top_operators": [
            (e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps)
            for e in sorted(operators, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
        ],
    }


def markdown(header: str, results: dict[str, dict]) -> str:
    lines = [
        header,
        "",
        "| variant | host ms to queue a step | wall ms/step | profiled wall ms/step | GPU kernel ms/step | GPU busy | "
        "kernel launches/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        busy = "-" if r["busy"] is None else f"{r['busy']:.0%}"
        lines.append(
            f"| {key} | {r['host_ms']:.1f} | {r['unprofiled_wall_ms']:.1f} | {r['wall_ms']:.1f} | "
            f"{r['kernel_ms']:.1f} | {busy} | {r['launches']:.0f} |"
        )
    for key, r in results.items():
        for title, rows, unit in (
            ("kernels by GPU time", r["top_kernels"], "GPU"),
            ("host operators by self CPU time", r["top_operators"], "CPU"),
        ):
            if not rows:  # no GPU
                continue
            lines += ["", f"{key}: top {TOP} {title}", "", f"| name | {unit} ms/step | calls/step |", "|---|---|---|"]
            lines += [f"| `{name[:90]}` | {ms:.2f} | {calls:.0f} |" for name, ms, calls in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="reduced shapes and fp32 (CPU smoke run)")
    parser.add_argument("--variants", nargs="+", default=["lora:all", "full:all"], help="bench.train_throughput keys")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    register_schema()
    setting = bench_setting(args.small)
    known = {variant.key: variant for variant in all_variants()}
    unknown = sorted(set(args.variants) - set(known))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(known)}")
    header = (
        f"Device: {setting.device}; {setting.describe()}; plain loop, {args.steps} profiled steps after "
        f"{args.warmup}; torch {torch.__version__}."
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = write_backbone(setting.shape, Path(tmp) / "backbone")
        for key in args.variants:
            variant = known[key]
            pool = BatchPool(setting.shape, variant.batch, args.warmup + args.steps)
            cfg = make_config(backbone_dir, setting.shape, variant, setting.precision)
            results[key] = profile_variant(cfg, pool, args.warmup)
            report = markdown(header, results)
            atomic_write_text(args.out / f"train_profile_{'cuda' if setting.cuda else 'cpu'}.md", report)
    print(report)


if __name__ == "__main__":
    main()
