"""Time and peak memory of `utils.metrics.rank_metrics` against the full-sort reference (IRRA's `rank` algorithm).

    uv run python -m bench.eval_metrics                                  # every size on the CPU
    uv run python -m bench.eval_metrics --device cuda --repeats 3
    uv run python -m bench.eval_metrics --sizes vn3k cuhk --scores random --threads 1 --skip-reference-above 2e8

Sizes are the test splits of VN3K (4,000 captions x 2,000 images), CUHK-PEDES (6,156 x 3,074) and ICFG-PEDES
(19,848 x 19,848), plus 12,000 x 12,000. Every size is measured on two seeded similarity matrices with the same
person ids (every id has at least two images, ICFG about 20; every 100th image a copy of its neighbour):

- ``realistic``: shaped like a trained model's text-to-image scores: unit-norm features around one centre per person
  id, quantised to the float16 grid as under autocast (so exact ties are common; copied images give whole tied
  columns);
- ``random``: standard normal scores, as an untrained model (zero-shot evaluation, early epochs) gives: half the
  gallery then scores above a query's lowest-scoring relevant item.

Every (size, scores, method) triple runs in a fresh subprocess: it builds the matrix, warms up on 64 queries, then
measures the time of the full call (fastest of ``--repeats``; wall time, and on the CPU also CPU time, from which the
CPU speed-up is taken since other processes on shared cores stretch wall times) and the peak memory above what
existed once the matrix was built: on the CPU the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated``. Both methods must return the same numbers (to
1e-9 percentage points, float64 summation order aside). Results: ``bench/results/eval_metrics_<device>.md`` and
``.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.eval_metrics_report import TOLERANCE, markdown, verdicts
from bench.reference_rank import reference_rank
from utils.io import atomic_write_json, atomic_write_text
from utils.metrics import rank_metrics

ROOT = Path(__file__).resolve().parents[1]

FEATURE_DIM = 64
# Feature noise around the id centres: gives R1 ~55-75% like published TBPS models on these datasets.
NOISE = 1.3
SEED = 0
# Extra peak of the reference per query-gallery entry, measured on the CPU (see reference_rank.py): 41 bytes from
# CUHK-PEDES size up (49 at VN3K size, where fixed costs weigh more); decides whether the reference fits in memory.
REFERENCE_BYTES_PER_ENTRY = 41


@dataclass(frozen=True)
class Size:
    """A benchmark matrix: ``queries`` captions ranked against ``gallery`` images of ``ids`` people."""

    queries: int
    gallery: int
    ids: int
    label: str


SIZES = {
    "vn3k": Size(4000, 2000, 950, "VN3K test"),
    "cuhk": Size(6156, 3074, 1000, "CUHK-PEDES test"),
    "12k": Size(12000, 12000, 2000, "12,000 x 12,000"),
    "icfg": Size(19848, 19848, 1000, "ICFG-PEDES test"),
}
SCORES = ("realistic", "random")
#: method name -> factory of the ranking call (given rank_metrics' memory budget).
METHODS: dict[str, Callable[[int | None], Callable]] = {
    "reference": lambda budget: reference_rank,
    "rank_metrics": lambda budget: functools.partial(rank_metrics, memory_budget_bytes=budget),
}


def make_case(
    size: Size, device: torch.device, scores: str = "realistic"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return a seeded (Q, G) float32 similarity matrix on `device` with query and gallery pids (see module doc)."""
    gen = torch.Generator().manual_seed(SEED)
    spread = torch.randint(0, size.ids, (size.gallery - 2 * size.ids,), generator=gen)
    gallery_pids = torch.cat([torch.arange(size.ids), torch.arange(size.ids), spread])
    gallery_pids = gallery_pids[torch.randperm(size.gallery, generator=gen)]
    centres = torch.randn(size.ids, FEATURE_DIM, generator=gen)
    image_feats = centres[gallery_pids] + NOISE * torch.randn(size.gallery, FEATURE_DIM, generator=gen)
    copies = torch.arange(100, size.gallery, 100)  # identical images: same person, same features
    gallery_pids[copies], image_feats[copies] = gallery_pids[copies - 1], image_feats[copies - 1]
    query_pids = gallery_pids[torch.randperm(size.queries, generator=gen) % size.gallery]  # captions per image
    text_feats = centres[query_pids] + NOISE * torch.randn(size.queries, FEATURE_DIM, generator=gen)

    image_feats = torch.nn.functional.normalize(image_feats, dim=1).to(device)
    text_feats = torch.nn.functional.normalize(text_feats, dim=1).to(device)
    similarity = torch.empty(size.queries, size.gallery, device=device)
    for start in range(0, size.queries, 1024):  # row blocks keep the setup's own peak small
        if scores == "random":
            block = torch.randn(min(1024, size.queries - start), size.gallery, generator=gen)
        else:
            block = (text_feats[start : start + 1024] @ image_feats.T).half().float()
        similarity[start : start + 1024] = block.to(device)
    return similarity, query_pids.to(device), gallery_pids.to(device)


def candidate_fraction(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> float:
    """Fraction of entries scoring at least their query's lowest relevant score.

    Random scores put half the gallery there: rank_metrics' earlier algorithm ranked exactly those, and slowed down.
    """
    count = 0
    for start in range(0, len(query_pids), 1024):
        block = similarity[start : start + 1024]
        relevant = query_pids[start : start + 1024, None] == gallery_pids[None, :]
        lowest = torch.where(relevant, block, torch.inf).amin(1, keepdim=True)
        count += int((block >= lowest).sum())
    return count / similarity.numel()


class _CpuPeak:
    """Resident-set high-water mark above the level when `start` was called."""

    def start(self) -> None:
        gc.collect()
        # Hand freed heap pages back to the OS first: memory that setup or warm-up freed but malloc kept resident would
        # otherwise be reused without raising the mark, hiding part of the measured call's peak.
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False  # the mark then also covers building the matrix (kept small on purpose)
        self.base = self._status_bytes("VmRSS")

    def extra_bytes(self) -> int:
        return max(0, self._status_bytes("VmHWM") - self.base)

    @staticmethod
    def _status_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field} line; the CPU peak needs Linux procfs.")


class _CudaPeak:
    """`torch.cuda.max_memory_allocated` above the allocation when `start` was called."""

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base, self.reset = torch.cuda.memory_allocated(), True

    def extra_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


PEAK_METERS = {"cpu": _CpuPeak, "cuda": _CudaPeak}


def run_worker(args: argparse.Namespace) -> dict:
    """Build one matrix, time one method on it and measure its extra peak memory (runs in a subprocess)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    (scores,) = args.scores  # the parent passes one kind per worker
    similarity, query_pids, gallery_pids = make_case(SIZES[args.size], device, scores)
    method = METHODS[args.method](args.memory_budget_bytes)
    method(similarity[:64], query_pids[:64], gallery_pids)  # warm-up: thread pool, kernels, allocator
    meter = PEAK_METERS[device.type]()
    meter.start()
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = method(similarity, query_pids, gallery_pids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    result = {
        "seconds": min(seconds),
        "all_seconds": seconds,
        "cpu_seconds": min(cpu_seconds),
        "extra_peak_bytes": meter.extra_bytes(),
        "peak_reset": meter.reset,
        "metrics": metrics,
        "similarity_bytes": similarity.numel() * similarity.element_size(),
    }
    if args.method == "rank_metrics":
        result["candidate_fraction"] = candidate_fraction(similarity, query_pids, gallery_pids)
    return result


def spawn(method: str, size: str, scores: str, args: argparse.Namespace) -> dict:
    """Run `run_worker` for (method, size, scores) in a fresh Python process; return its result or an error."""
    command = [sys.executable, "-m", "bench.eval_metrics", "--worker", "--method", method, "--size", size]
    command += ["--scores", scores]
    command += ["--device", args.device, "--repeats", str(args.repeats)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.memory_budget_bytes is not None:
        command += ["--memory-budget-bytes", str(args.memory_budget_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode == -9 else ""
        last = (done.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"exit code {done.returncode}{killed}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_skip_reason(size: Size, args: argparse.Namespace) -> str | None:
    """Why the reference is not run at this size, or None: too many entries, or not enough free CPU memory."""
    entries = size.queries * size.gallery
    if args.skip_reference_above is not None and entries > args.skip_reference_above:
        return f"skipped: {entries:.3g} entries > --skip-reference-above {args.skip_reference_above:.3g}"
    if args.device == "cpu":
        needed = entries * (4 + REFERENCE_BYTES_PER_ENTRY)
        available = _mem_available_bytes()
        if available is not None and needed > 0.95 * available:
            return f"skipped: needs ~{needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    return None


def _mem_available_bytes() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def compare(reference: dict, ours: dict, device: str) -> dict:
    """Speed-up, memory ratio and largest metric difference of two worker results (None where one is missing).

    On the CPU the speed-up is the ratio of CPU times (user + system): other processes on shared cores stretch the
    wall time of a run, not the CPU time it uses; ``wall_speedup`` is kept beside it. On CUDA both are wall times.
    """
    if "seconds" not in reference or "seconds" not in ours:
        return {"speedup": None, "wall_speedup": None, "memory_ratio": None, "max_abs_diff": None, "identical": None}
    timer = "cpu_seconds" if device == "cpu" else "seconds"
    diff = max(abs(reference["metrics"][key] - ours["metrics"][key]) for key in ours["metrics"])
    return {
        "speedup": reference[timer] / ours[timer],
        "wall_speedup": reference["seconds"] / ours["seconds"],
        "memory_ratio": ours["extra_peak_bytes"] / max(reference["extra_peak_bytes"], 1),
        "max_abs_diff": diff,
        "identical": diff <= TOLERANCE,
    }


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES), help="kinds of similarity")
    parser.add_argument("--device", choices=list(PEAK_METERS), default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per method and size (the best counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-budget-bytes", type=int, default=None, help="rank_metrics budget (default: its own)")
    parser.add_argument(
        "--skip-reference-above", type=float, default=None, help="skip the reference above this many Q x G entries"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device; none is visible.")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    rows = []
    for name in args.sizes:
        size = SIZES[name]
        for scores in args.scores:
            row = {
                "size": name,
                "scores": scores,
                "label": size.label,
                "queries": size.queries,
                "gallery": size.gallery,
            }
            for method in METHODS:
                skip = reference_skip_reason(size, args) if method == "reference" else None
                print(f"{size.label}, {scores} scores: {method} ...", flush=True)
                row[method] = {"skipped": skip} if skip else spawn(method, name, scores, args)
                print(f"  {row[method]}", flush=True)
            row["comparison"] = compare(row["reference"], row["rank_metrics"], args.device)
            rows.append(row)

    report = {
        "settings": {
            "device": args.device,
            "device_name": device_description(args.device),
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "repeats": args.repeats,
            "memory_budget": "default" if args.memory_budget_bytes is None else f"{args.memory_budget_bytes} bytes",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "rows": rows,
        "verdicts": verdicts(rows),
    }
    table = markdown(report)
    atomic_write_text(args.out / f"eval_metrics_{args.device}.md", table)
    atomic_write_json(args.out / f"eval_metrics_{args.device}.json", report)
    print(table)


if __name__ == "__main__":
    main()
