"""What the training benchmarks share: the shapes, the synthetic batches, the recipe's config, and a plain training
loop with the levers `TBPSLitModule.setup` applies (bench.train_throughput compares it with Lightning,
bench.train_profile profiles it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import SiglipConfig, SiglipModel

from lightning_models import TBPSLitModule
from model.build import autocast_dtype
from model.strategies import StepContext
from solver.build import build_optimizer

ROOT = Path(__file__).resolve().parents[1]

REAL = dict(text=dict(vocab_size=250000), vision=dict(image_size=256), image=(384, 128))
SMALL = dict(
    text=dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    vision=dict(image_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    image=(128, 48),
)


@dataclass(frozen=True)
class Variant:
    name: str
    lora: bool
    overrides: tuple[str, ...]
    batch: int = 24
    sync_every_step: bool = False  # the non-finite check read on the host after every step (the code before)
    cap_gib: float | None = None
    bare: bool = False
    eager_twin: str | None = None  # the variant whose losses this one must reproduce

    @property
    def key(self) -> str:
        return f"{'lora' if self.lora else 'full'}:{self.name}"


def write_backbone(shape: dict, out_dir: Path) -> Path:
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=shape["text"], vision_config=shape["vision"])).save_pretrained(out_dir)
    return out_dir


def make_config(backbone_dir: Path, shape: dict, variant: Variant, precision: str):
    height, width = shape["image"]
    overrides = [
        f"backbone.path={backbone_dir}",
        f"img_size_str='({height},{width})'",
        f"dataset.batch_size={variant.batch}",
        "loss.strategy=auxiliary_cross",
        "loss.CIR=true",
        "loss.circle_loss_weight=0.1",
        f"++trainer.precision={precision}",
        *(["lora=cir"] if variant.lora else []),
        *variant.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return compose(config_name="cir_msiglip", overrides=overrides)


class BatchPool(torch.utils.data.Dataset):
    """`steps` training batches cycling through `distinct` generated ones (pinned on CUDA), as the loader yields."""

    def __init__(self, shape: dict, batch: int, steps: int, distinct: int = 4):
        generator = torch.Generator().manual_seed(0)
        height, width = shape["image"]
        self.steps, self.pool = steps, []
        for _ in range(distinct):
            ids = torch.randint(3, shape["text"]["vocab_size"], (batch, 64), generator=generator)
            ids[:, -8:] = 1  # right padding with </s>, as the tokenizer produces
            item = {view: torch.randn(batch, 3, height, width, generator=generator) for view in VIEWS}
            item |= {"caption_input_ids": ids, "pids": torch.arange(batch // 4).repeat_interleave(4)}
            self.pool.append({k: v.pin_memory() if torch.cuda.is_available() else v for k, v in item.items()})

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return self.pool[index % len(self.pool)]


VIEWS = ("images", "aug_images", "ss_images1", "ss_images2")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_backward(model, objective, batch, autocast):
    with autocast:
        feats = model(batch, aug_view=objective.needs_aug_view, ss_views=objective.needs_ss_views)
        loss = torch.stack(list(objective(feats, StepContext(epoch=0.0)).values())).sum()
    loss.backward()
    return loss


def bare_step(model, objective, optimizer, autocast, batch: dict, *, read_loss: bool = False) -> torch.Tensor:
    """One training step of the plain loop on a host `batch` (copied to the model's device); `read_loss`: read the
    loss on the host (a non-finite check and a logger would), which waits for the step.
    """
    device = next(model.parameters()).device
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    loss = forward_backward(model, objective, batch, autocast)
    if read_loss:
        bool(torch.isfinite(loss))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@dataclass(frozen=True)
class BenchSetting:
    """Shapes, precision and device of a benchmark run: the real architecture in bf16 on CUDA, else reduced fp32."""

    shape: dict
    precision: str
    device: str

    @property
    def cuda(self) -> bool:
        return self.device != "cpu"

    def describe(self) -> str:
        height, width = self.shape["image"]
        model = "real multilingual architecture" if self.shape is REAL else "reduced shapes"
        return f"{model}, {height}x{width}, {self.precision}"


def bench_setting(small: bool) -> BenchSetting:
    cuda = torch.cuda.is_available()
    real = cuda and not small
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return BenchSetting(REAL if real else SMALL, "bf16-mixed" if real else "32-true", device)


def bare_setup(cfg):
    """Model, objective, optimizer and autocast context with the levers `TBPSLitModule.setup` applies for `fit`."""
    torch.manual_seed(0)
    module = TBPSLitModule(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.prepare("fit", device, cfg.trainer.precision)
    model, objective = module.model.train().to(device), module.objective
    optimizer = build_optimizer(cfg.optimizer, model)
    dtype = autocast_dtype(cfg.trainer.precision)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    return model, objective, optimizer, autocast
