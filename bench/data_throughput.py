"""Samples per second of the real training data pipeline, per DataLoader worker, and the workers a GPU rate needs.

    uv run python -m bench.data_throughput                  # 384x128 JPEG person crops, the recipes' view sets
    uv run python -m bench.data_throughput --images 400 --workers 1 2

A training sample is one JPEG decode plus the views its loss asks for: the original view, the MVS augmented view,
and SimCLR's two strong views (the Circle-Loss recipe `cir_msiglip` with `loss.SS=true` asks for all four). The
transforms are the data module's own (`aug=siglip` at `img_size_str="(384,128)"`), built through the composed config,
so the benchmark times exactly what training runs. Images are generated person crops saved as JPEG at 384x128.

For each view set it reports samples/s of one process (= one worker), samples/s through a DataLoader with each worker
count asked for, and the workers needed to feed each measured GPU rate of `bench/results/train_throughput_*.json`
(ceil(GPU samples/s / per-worker samples/s)). Results: `bench/results/data_throughput_cpu.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from config_schema import register_schema
from data.synthetic import SyntheticSpec, generate_vn3k
from lightning_data import TBPSDataModule
from utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: View set -> loss overrides that ask for it.
VIEW_SETS = {
    "original": ["loss.MVS=false", "loss.SS=false"],
    "original + MVS view": ["loss.MVS=true", "loss.SS=false"],
    "original + MVS + 2 SimCLR (cir_msiglip)": ["loss.MVS=true", "loss.SS=true"],
}
#: The baseline row: the SimCLR views with torchvision's blur (SimCLR's kernel of 10 % of each side), as before.
TORCHVISION_BLUR = "original + MVS + 2 SimCLR, torchvision blur (before)"


def build_dataset(root: Path, overrides: list[str]):
    """The training dataset of `-cn cir_msiglip` at 384x128 with `overrides`, as the data module builds it."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose(
            config_name="cir_msiglip",
            overrides=[
                f"dataset_root_dir={root}",
                'img_size_str="(384,128)"',
                "dataset.val_identities=0",  # the generated data has its own validation split
                "dataset.num_workers=0",  # the data module's own loader is not iterated here
                *overrides,
            ],
        )
    datamodule = TBPSDataModule(cfg, tokenizer=None, simclr_views=cfg.loss.SS)
    datamodule.setup()
    return datamodule.train_dataloader().dataset


def with_torchvision_blur(dataset):
    """`dataset` with the SimCLR blur swapped for torchvision's convolution (the transform before GaussianBlurSigma)."""
    from torchvision.transforms import v2

    height, width = dataset.simclr_transform.transforms[0].size
    kernel = tuple(max(3, int(0.1 * side) // 2 * 2 + 1) for side in (width, height))
    steps = list(dataset.simclr_transform.transforms)
    index = next(i for i, step in enumerate(steps) if isinstance(step, v2.RandomApply) and "Blur" in repr(step))
    steps[index] = v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)
    dataset.simclr_transform = v2.Compose(steps)
    return dataset


def one_process_rate(dataset, count: int) -> float:
    """Samples/s of `dataset[i]` in this process: decode plus every view, what one worker does."""
    dataset[0]  # warm up (first decode, lazy imports)
    start = time.perf_counter()
    for index in range(count):
        dataset[index % len(dataset)]
    return count / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, count: int, batch: int) -> float:
    """Samples/s through a DataLoader with `workers` processes (stacking only: no tokenisation)."""
    loader = DataLoader(
        torch.utils.data.Subset(dataset, [i % len(dataset) for i in range(count)]),
        batch_size=batch,
        num_workers=workers,
        collate_fn=lambda samples: len(samples),
        persistent_workers=False,
    )
    iterator = iter(loader)
    seen = next(iterator)  # workers started and warm
    start = time.perf_counter()
    for size in iterator:
        seen += size
    return (seen - batch) / (time.perf_counter() - start)


def gpu_rates(folder: Path) -> dict[str, float]:
    """Measured training samples/s of the batch-24 rows with the CUDA defaults (`all`) and before them."""
    rates = {}
    path = folder / "train_throughput_cuda.json"
    if path.is_file():
        report = json.loads(path.read_text())
        for row in report["rows"]:
            if row["batch"] == 24 and row["variant"].split(":")[1] in ("before", "all"):
                rates[f"{report['device']}, {row['variant']}"] = row["samples_per_s"]
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="samples timed per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (a worker uses 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the tables go (and the GPU rates are read)")
    parser.add_argument("--tag", default="cpu", help="file name suffix: data_throughput_<tag>.{md,json}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_schema()
    with tempfile.TemporaryDirectory() as tmp:
        # Person crops drawn at 384x128 and stored as JPEG, like the datasets' files.
        generate_vn3k(tmp, SyntheticSpec(num_identities=60, images_per_identity=(2, 3), image_size=(384, 128)))
        rows = []
        cases = [*VIEW_SETS.items(), (TORCHVISION_BLUR, VIEW_SETS["original + MVS + 2 SimCLR (cir_msiglip)"])]
        for name, overrides in cases:
            dataset = build_dataset(Path(tmp), overrides)
            if name == TORCHVISION_BLUR:
                dataset = with_torchvision_blur(dataset)
            row = {"views": name, "per_worker": one_process_rate(dataset, args.images), "loader": {}}
            for workers in args.workers:
                row["loader"][workers] = loader_rate(dataset, workers, args.images, args.batch)
            rows.append(row)
            print(f"{name}: {row['per_worker']:.1f} samples/s per worker; loader {row['loader']}", flush=True)
    report = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "image": [384, 128],
        "rows": rows,
        "gpu_rates": gpu_rates(args.out),
    }
    atomic_write_json(args.out / f"data_throughput_{args.tag}.json", report)
    atomic_write_text(args.out / f"data_throughput_{args.tag}.md", markdown(report, args.workers))


def markdown(report: dict, workers: list[int]) -> str:
    lines = [
        "# Training data pipeline throughput",
        "",
        f"{report['cpu']}, {report['cores']} cores; torch {report['torch']}; JPEG person crops decoded and "
        "transformed at 384x128 by the data module's own training transforms (`aug=siglip`).",
        "",
        "| views per sample | samples/s, 1 process | "
        + " | ".join(f"DataLoader, {w} worker(s)" for w in workers)
        + " | "
        + " | ".join(f"workers for {name} ({rate:.0f}/s)" for name, rate in report["gpu_rates"].items())
        + " |",
        "|" + "---|" * (2 + len(workers) + len(report["gpu_rates"])),
    ]
    for row in report["rows"]:
        cells = [row["views"], f"{row['per_worker']:.1f}"]
        cells += [f"{row['loader'][w]:.1f}" for w in workers]
        cells += [str(math.ceil(rate / row["per_worker"])) for rate in report["gpu_rates"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    by_name = {row["views"]: row["per_worker"] for row in report["rows"]}
    speedup = by_name["original + MVS + 2 SimCLR (cir_msiglip)"] / by_name[TORCHVISION_BLUR]
    lines += [
        "",
        f"SimCLR's blur through PIL instead of torchvision's convolution: {speedup:.1f}x the samples/s per worker of "
        "the Circle-Loss recipe's four views (same run).",
        "",
        "Workers needed = ceil(GPU training samples/s / samples/s of one process); the GPU rates are the measured "
        "batch-24 rows of `train_throughput_cuda.json` (before the speed levers, and with the CUDA defaults). A worker "
        "is one process on one core.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
