"""Training throughput, peak memory and model FLOP utilisation of the Circle-Loss recipe, lever by lever.

    uv run python -m bench.train_throughput                      # CUDA: real multilingual architecture, 384x128, bf16
    uv run python -m bench.train_throughput --small              # CPU-sized shapes, fp32 (a smoke run of the bench)
    uv run python -m bench.train_throughput --variants full:before full:all

The backbone is `google/siglip-base-patch16-256-multilingual`'s architecture (vocab 250,000, 12+12 layers of width
768) built from its config with random weights, so no download is needed. Every variant trains the original
project's selected recipe (auxiliary_cross: N-ITC + cross-modal Circle, MVS, SimCLR, C-ITC; 6 identities x 4 images,
captions of 64 tokens) on the same synthetic batches with `TBPSLitModule` in a `lightning.Trainer` that logs (to a
CSV file, every `trainer.log_every_n_steps` of the recipe) and shows its progress bar as `trainer.py` does, without
gradient accumulation; variants marked "bare" also run a hand-written loop over the same model, objective and
optimizer with the same levers, reading the loss when the Lightning run logs (the Lightning/bare ratio). Variants add
one lever at a time to `before` (the code's behaviour before these levers: every parameter trained, loop AdamW, a
host synchronisation per step, frozen weights in fp32, eager):

- `frozen-emb`: no gradient or AdamW state for the 250,000 x 768 token embedding (`backbone.freeze.token_embedding`);
- `fused`: torch's fused AdamW (`optimizer.fused`);
- `8bit`: bitsandbytes' 8-bit AdamW;
- `ckpt`: gradient checkpointing of both towers;
- `compile`: torch.compile of the towers' layers (`backbone.compile`);
- `all`: the defaults on CUDA (frozen embedding, fused AdamW, no per-step synchronisation, frozen linear weights in
  bf16, compiled);
- `cap12` / `cap8`: `all` under a hard 12 / 8 GiB cap (`torch.cuda.set_per_process_memory_fraction`; the seed's RTX
  3060, an 8 GB card), gradient checkpointing left to the memory plan;
- `cudagraphs`: each compiled layer replayed as a CUDA graph (`backbone.compile_mode=reduce-overhead`);
- `autotune`: inductor searches the matrix-product kernels (`backbone.compile_mode=max-autotune-no-cudagraphs`);
- `fp32-frozen`: LoRA's frozen base weights kept in fp32 (`backbone.half_precision_frozen_weights=false`).

Reported per variant: samples/s after warm-up, speed-up over `before` of the same mode, peak allocated memory, the
model FLOPs per sample (`torch.utils.flop_counter` over one eager forward and backward), achieved TFLOP/s and MFU
against the card's dense bf16 peak, and the largest relative difference of the first steps' total losses from the
eager run with the same settings. Results, written after every variant (a timeout keeps what was measured):
bench/results/train_throughput_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from bench.train_setup import (
    ROOT,
    BatchPool,
    Variant,
    bare_setup,
    bare_step,
    bench_setting,
    forward_backward,
    make_config,
    sync,
    write_backbone,
)
from bench.train_throughput_report import Report, compare_with_eager_twin, fmt, peak_tflops
from config_schema import register_schema
from lightning_callbacks import LoggedStepProgressBar
from lightning_models import TBPSLitModule
from lightning_training_logs import LOG_LAG
from utils.deferred import DeferredScalars

GIB = 2**30

BEFORE = [
    "backbone.freeze.token_embedding=false",
    "optimizer.fused=false",
    "backbone.compile=false",
    "backbone.gradient_checkpointing=false",
    "backbone.half_precision_frozen_weights=false",
]
ALL = ["backbone.compile=true", "backbone.gradient_checkpointing=false"]
#: Variant name parts whose lever needs CUDA (bitsandbytes, CUDA graphs, Triton kernel tuning).
CUDA_ONLY_LEVERS = ("8bit", "cudagraphs", "autotune")
NO_DROPOUT = ["backbone.text_config.attention_dropout=0.0", "++backbone.vision_config.attention_dropout=0.0"]


def all_variants() -> list[Variant]:
    """In priority order (a time limit keeps the first ones): the goals' rows first, then one lever at a time."""
    eager = ("backbone.compile=false", "backbone.gradient_checkpointing=false")
    out = []
    for lora, cap in ((False, 12.0), (True, 8.0)):
        out += [
            Variant("before", lora, tuple(BEFORE), sync_every_step=True, bare=True),
            Variant("all", lora, tuple(ALL), bare=True, eager_twin="all-eager"),
            Variant("all-eager", lora, eager),
            # Checkpointing left to the memory plan (auto), which sees the cap.
            Variant(f"all-cap{cap:.0f}GiB", lora, (ALL[0], "backbone.gradient_checkpointing=null"), cap_gib=cap),
        ]
    frozen = ("backbone.freeze.token_embedding=true", *BEFORE[1:])
    out += [
        Variant("all-b128", False, tuple(ALL), batch=128),
        Variant("all-b128", True, tuple(ALL), batch=128),
        Variant("frozen-emb", False, frozen, sync_every_step=True),
        Variant("frozen-emb+fused", False, (frozen[0], "optimizer.fused=true", *BEFORE[2:]), sync_every_step=True),
        Variant("all+8bit", False, (*ALL, "optimizer.type=bitsandbytes.optim.AdamW8bit")),
        Variant("all+ckpt", False, (ALL[0], "backbone.gradient_checkpointing=true")),
        Variant("all+cudagraphs", True, (*ALL, "backbone.compile_mode=reduce-overhead"), eager_twin="all-eager"),
        Variant("all+cudagraphs", False, (*ALL, "backbone.compile_mode=reduce-overhead"), eager_twin="all-eager"),
        Variant("all+autotune", True, (*ALL, "backbone.compile_mode=max-autotune-no-cudagraphs")),
        Variant("all-fp32-frozen", True, (*ALL, "backbone.half_precision_frozen_weights=false")),
        Variant("all+ckpt", True, (ALL[0], "backbone.gradient_checkpointing=true")),
        # Compiled vs eager with dropout off: the loss difference is then the compiler's numerics alone.
        Variant("no-dropout", False, (*ALL, *NO_DROPOUT), eager_twin="no-dropout-eager"),
        Variant("no-dropout-eager", False, (*eager, *NO_DROPOUT)),
    ]
    return out


def _peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB; process-wide high-water mark


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class _Recorder(L.Callback):
    """Times the steps after warm-up and keeps each step's loss on the device (no synchronisation per step).

    The clock stops at the end of the last step, not when `fit` returns: Lightning's teardown moves the model and the
    optimizer state to the CPU (seconds for the full model), which is not training throughput.
    """

    def __init__(self, warmup: int, steps: int, sync_every_step: bool):
        self.warmup, self.steps, self.sync_every_step = warmup, steps, sync_every_step
        self.start = self.stop = None
        self.peak_gib = None
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync()
            _reset_peak()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())
        if self.sync_every_step:
            pl_module.check_finite()  # what the code did before: a host read of the loss after every step
        if batch_idx == self.steps - 1:
            sync()
            self.stop = time.perf_counter()
            self.peak_gib = _peak_gib()


def run_lightning(cfg, variant: Variant, pool: BatchPool, warmup: int, log_dir: Path) -> dict:
    torch.manual_seed(0)
    module = TBPSLitModule(cfg)
    recorder = _Recorder(warmup, len(pool), variant.sync_every_step)
    # Logged and shown as trainer.py does (CSV instead of W&B): the reads of logged values are part of a user's step.
    trainer = L.Trainer(
        max_steps=len(pool),
        precision=cfg.trainer.precision,
        accelerator="auto",
        devices=1,
        logger=CSVLogger(log_dir),
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder, LoggedStepProgressBar()],
    )
    loader = torch.utils.data.DataLoader(pool, batch_size=None, shuffle=False, pin_memory=torch.cuda.is_available())
    trainer.fit(module, train_dataloaders=loader)
    result = {
        "samples_per_s": (len(pool) - warmup) * variant.batch / (recorder.stop - recorder.start),
        "peak_gib": recorder.peak_gib,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "losses": [float(loss) for loss in recorder.losses],
        "checkpointing": bool(module.model.backbone.is_gradient_checkpointing),
    }
    del module, trainer
    return result


def run_bare(cfg, variant: Variant, pool: BatchPool, warmup: int) -> dict:
    """The same model, objective and optimizer with the same levers, trained by a plain loop that reads the loss when
    the Lightning run logs (every `trainer.log_every_n_steps` steps, `LOG_LAG` logged steps late as the module does),
    or at once after every step for `before`.
    """
    model, objective, optimizer, autocast = bare_setup(cfg)
    log_every = cfg.trainer.log_every_n_steps
    log_every = 50 if log_every is None else log_every  # Lightning's default when the config leaves it unset
    logged = DeferredScalars(LOG_LAG)
    start = None
    for step in range(len(pool)):
        if step == warmup:
            sync()
            _reset_peak()
            start = time.perf_counter()
        loss = bare_step(model, objective, optimizer, autocast, pool[step], read_loss=variant.sync_every_step)
        if log_every > 0 and (step + 1) % log_every == 0:
            logged.put(step, {"loss": loss})
            logged.take()
    sync()
    elapsed = time.perf_counter() - start
    result = {"samples_per_s": (len(pool) - warmup) * variant.batch / elapsed, "peak_gib": _peak_gib()}
    del model, optimizer
    return result


def flops_per_sample(cfg, pool: BatchPool) -> float:
    """Model FLOPs of one eager forward and backward, per sample (matrix products and attention, as counted)."""
    torch.manual_seed(0)
    module = TBPSLitModule(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, objective = module.model.to(device).train(), module.objective
    batch = {key: value.to(device) for key, value in pool[0].items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision.startswith("bf16"))
    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward(model, objective, batch, autocast)
    del module, model
    return counter.get_total_flops() / batch["pids"].numel()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="reduced shapes and fp32 (CPU smoke run)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps after warm-up")
    parser.add_argument("--variants", nargs="+", help="mode:variant keys to run (default: all, in order)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    register_schema()
    setting = bench_setting(args.small)
    cuda, shape, precision, device = setting.cuda, setting.shape, setting.precision, setting.device
    variants = [v for v in all_variants() if not args.variants or v.key in args.variants]
    if not cuda:  # CUDA-only levers, and a CPU smoke run keeps to the goals' rows
        variants = [
            v
            for v in variants
            if v.cap_gib is None and not any(lever in v.name for lever in CUDA_ONLY_LEVERS) and v.batch < 128
        ]
    peak = peak_tflops(device)
    report = Report(
        device,
        f"Device: {device} (dense bf16 peak {peak or 'unknown'} TFLOP/s); {setting.describe()}, "
        f"{args.steps} timed steps after {args.warmup}; torch {torch.__version__}; peak = "
        f"{'GPU memory allocated' if cuda else 'process RSS'}. MFU = model FLOPs per sample x samples/s / peak.",
    )
    tag = "cuda" if cuda else "cpu"
    flops: dict[tuple[bool, int], float] = {}
    done: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = write_backbone(shape, Path(tmp) / "backbone")
        for variant in variants:
            pool = BatchPool(shape, variant.batch, args.warmup + args.steps)
            cfg = make_config(backbone_dir, shape, variant, precision)
            if (variant.lora, variant.batch) not in flops:
                flops[(variant.lora, variant.batch)] = flops_per_sample(cfg, pool)
                _free()
            if variant.cap_gib is not None:
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, variant.cap_gib * GIB / total))
            try:
                row = run_lightning(cfg, variant, pool, args.warmup, Path(tmp) / "logs")
            except Exception as error:  # out of memory, a missing optional package: report it, run the others
                print(f"{variant.key}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
                report.failures.append(f"{variant.key} (batch {variant.batch}): {type(error).__name__}")
                _free()
                continue
            _free()
            row |= {"variant": variant.key, "batch": variant.batch}
            if variant.eager_twin:
                row["eager_twin"] = f"{variant.key.split(':')[0]}:{variant.eager_twin}"
            if variant.bare:
                bare = run_bare(cfg, variant, pool, args.warmup)
                _free()
                row |= {"bare_samples_per_s": bare["samples_per_s"], "bare_peak_gib": bare["peak_gib"]}
                row["ratio"] = row["samples_per_s"] / bare["samples_per_s"]
            row["flops_per_sample"] = flops[(variant.lora, variant.batch)]
            row["tflops"] = row["flops_per_sample"] * row["samples_per_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
            base = done.get(f"{'lora' if variant.lora else 'full'}:before")
            row["speedup"] = row["samples_per_s"] / base["samples_per_s"] if base else None
            done[variant.key] = row
            report.rows.append(row)
            for earlier in report.rows:
                compare_with_eager_twin(earlier, done)
            report.write(args.out, tag)
            print(
                f"{variant.key} b{variant.batch}: {row['samples_per_s']:.1f} samples/s, {row['peak_gib']:.2f} GiB, "
                f"MFU {fmt(row['mfu'], '{:.1%}')}, vs before {fmt(row['speedup'], '{:.2f}x')}, "
                f"bare ratio {fmt(row.get('ratio'), '{:.3f}')}",
                flush=True,
            )
    print(Path(args.out / f"train_throughput_{tag}.md").read_text())


if __name__ == "__main__":
    main()
