"""Training throughput and peak memory: TBPSLitModule under Lightning vs a bare PyTorch loop, same model and loss.

    uv run python -m bench.train_throughput          # CUDA: real multilingual architecture, 384x128, bf16, batch 24
    uv run python -m bench.train_throughput --small  # CPU-sized shapes, fp32 (bf16 is ~30x slower on most CPUs)

The backbone is `google/siglip-base-patch16-256-multilingual`'s architecture (vocab 250,000, 12+12 layers of width
768) built from its config with random weights, so no download is needed. Both loops train the original project's
selected recipe (auxiliary_cross: N-ITC + cross-modal Circle, MVS, SimCLR, C-ITC) on identical synthetic batches (6
identities x 4 images, captions of 64 tokens): the Lightning side is `TBPSLitModule` in a `lightning.Trainer`, the
baseline is a hand-written loop over the same `TBPS` model, objective and optimizer. Measured after warm-up steps,
per configuration (LoRA r 32 and full fine-tuning): samples/s, peak accelerator memory (or peak RSS on CPU) and
the Lightning/bare ratio. Results: bench/results/train_throughput_<device>.{md,json}.
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
from hydra import compose, initialize_config_dir
from transformers import SiglipConfig, SiglipModel

from config_schema import register_schema
from lightning_models import TBPSLitModule
from model.strategies import StepContext
from solver.build import build_optimizer
from utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

MODES = [("LoRA r32", True, "lora"), ("full", False, "full")]
REAL = dict(text=dict(vocab_size=250000), vision=dict(image_size=256), image=(384, 128), batch=24)
SMALL = dict(
    text=dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    vision=dict(image_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    image=(128, 48),
    batch=8,
)


def write_backbone(shape: dict, out_dir: Path) -> Path:
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=shape["text"], vision_config=shape["vision"])).save_pretrained(out_dir)
    return out_dir


def make_config(backbone_dir: Path, shape: dict, lora: bool, precision: str):
    height, width = shape["image"]
    overrides = [
        f"backbone.path={backbone_dir}",
        f"img_size_str='({height},{width})'",
        f"dataset.batch_size={shape['batch']}",
        "loss.strategy=auxiliary_cross",
        "loss.CIR=true",
        "loss.circle_loss_weight=0.1",
        f"++trainer.precision={precision}",
        *(["lora=cir"] if lora else []),
    ]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return compose(config_name="cir_msiglip", overrides=overrides)


def make_batches(shape: dict, steps: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batch, (height, width) = shape["batch"], shape["image"]

    def images() -> torch.Tensor:
        return torch.randn(batch, 3, height, width, generator=generator)

    ids = torch.randint(3, vocab, (batch, 64), generator=generator)
    ids[:, -8:] = 1  # right padding with </s>, as the tokenizer produces
    pids = torch.arange(batch // 4).repeat_interleave(4)  # identity sampler: P identities x 4 instances
    pin = torch.cuda.is_available()  # both loops then copy from page-locked memory
    return [
        {key: value.pin_memory() if pin else value for key, value in batch.items()}
        for batch in (
            {
                "images": images(),
                "aug_images": images(),
                "ss_images1": images(),
                "ss_images2": images(),
                "caption_input_ids": ids.clone(),
                "pids": pids.clone(),
            }
            for _ in range(steps)
        )
    ]


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.batches[index]


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync()
            _reset_peak()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB; process-wide high-water mark


def run_lightning(cfg, batches, warmup: int) -> dict:
    torch.manual_seed(0)
    module = TBPSLitModule(cfg)
    timer = _Timer(warmup)
    trainer = L.Trainer(
        max_steps=len(batches),
        precision=cfg.trainer.precision,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False, pin_memory=True)
    trainer.fit(module, train_dataloaders=loader)
    timed = len(batches) - warmup
    result = {
        "samples_per_s": timed * batches[0]["pids"].numel() / (timer.end - timer.start),
        "peak_gib": _peak_gib(),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }
    del module, trainer
    return result


def run_bare(cfg, batches, warmup: int) -> dict:
    torch.manual_seed(0)
    module = TBPSLitModule(cfg)  # the same model and objective, trained without Lightning
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, objective = module.model.to(device).train(), module.objective
    optimizer = build_optimizer(cfg.optimizer, model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision.startswith("bf16"))
    start = None
    for step, batch in enumerate(batches):
        if step == warmup:
            _sync()
            _reset_peak()
            start = time.perf_counter()
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with autocast:
            feats = model(batch, aug_view=objective.needs_aug_view, ss_views=objective.needs_ss_views)
            loss = torch.stack(list(objective(feats, StepContext(epoch=0.0)).values())).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    elapsed = time.perf_counter() - start
    result = {"samples_per_s": (len(batches) - warmup) * batches[0]["pids"].numel() / elapsed, "peak_gib": _peak_gib()}
    del module, model, optimizer
    return result


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="reduced shapes for a CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps after warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["lora", "full"],
        default=["lora", "full"],
        help="one mode per process gives each its own CPU peak RSS",
    )
    args = parser.parse_args(argv)
    register_schema()
    cuda = torch.cuda.is_available()
    shape = SMALL if args.small or not cuda else REAL
    precision = "bf16-mixed" if cuda else "32-true"
    device = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = write_backbone(shape, Path(tmp) / "backbone")
        batches = make_batches(shape, args.warmup + args.steps, shape["text"]["vocab_size"])
        for mode, lora in [(name, lora) for name, lora, key in MODES if key in args.modes]:
            cfg = make_config(backbone_dir, shape, lora, precision)
            bare = run_bare(cfg, batches, args.warmup)
            _free()
            lit = run_lightning(cfg, batches, args.warmup)
            _free()
            rows.append(
                {"mode": mode, "lightning": lit, "bare": bare, "ratio": lit["samples_per_s"] / bare["samples_per_s"]}
            )
            print(
                f"{mode}: lightning {lit['samples_per_s']:.1f} samples/s ({lit['peak_gib']:.2f} GiB), bare "
                f"{bare['samples_per_s']:.1f} samples/s ({bare['peak_gib']:.2f} GiB), ratio {rows[-1]['ratio']:.3f}",
                flush=True,
            )
    height, width = shape["image"]
    memory = "peak GPU memory allocated" if cuda else "peak process RSS (high-water mark, cumulative)"
    lines = [
        f"Device: {device}; {'real multilingual architecture' if shape is REAL else 'reduced shapes'}, "
        f"{height}x{width}, batch {shape['batch']}, {precision}, {args.steps} timed steps after {args.warmup}; "
        f"memory = {memory}.",
        "",
        "| mode | trainable params | Lightning samples/s | bare samples/s | ratio | Lightning GiB | bare GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lit, bare = row["lightning"], row["bare"]
        lines.append(
            f"| {row['mode']} | {lit['trainable']:,} | {lit['samples_per_s']:.1f} | "
            f"{bare['samples_per_s']:.1f} | {row['ratio']:.3f} | {lit['peak_gib']:.2f} | {bare['peak_gib']:.2f} |"
        )
    tag = ("cuda" if cuda else "cpu") + ("" if len(args.modes) == 2 else "_" + args.modes[0])
    atomic_write_text(args.out / f"train_throughput_{tag}.md", "\n".join(lines) + "\n")
    atomic_write_json(args.out / f"train_throughput_{tag}.json", {"device": device, "shape": str(shape), "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
