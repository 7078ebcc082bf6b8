"""Gallery search at 100k and 1M images: the faiss backends against today's matrix product.

    uv run python -m bench.search_scale                         # 10k, 30k, 100k and 1M rows
    uv run python -m bench.search_scale --sizes 100k --queries 200

Embeddings are synthetic, 768-d, L2-normalised float32 and clustered like a person gallery: one cluster per ~20
images (a person), cluster centres correlated through a 64-d latent space (real embeddings are anisotropic), each
image its centre plus noise (cosine ~0.55 to its centre) and each query a centre plus more noise (a text query
lies farther from the images than they lie from each other: top-1 cosine ~0.3, as with text-image models). Seeded.

For each size and engine (`search_app.backends`: `matmul`, `faiss-flat`, `faiss-ivf` with the parameters the index
would choose for that size) it measures queries/s one query per call (the web page) and for a batch of every query
in one call (`search.py query --file`), the build time (IVF: train, assign, fill) and the resident memory the
engine adds (VmRSS after building minus before); recall@10 is the share of the exact top-10 (matmul) that an engine
returns, and for IVF a sweep over nprobe shows the recall/speed trade-off. The exact backends must agree with
matmul. The process's peak resident memory (VmHWM) is reported per size. Results:
`bench/results/search_scale_cpu.md` and `.json`.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import torch

from search_app.backends import (
    EXACT_UP_TO,
    IVFParams,
    MatmulRanker,
    Ranker,
    assign_lists,
    flat_ranker,
    ivf_ranker,
    train_ivf,
)
from utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DIM, LATENT, IMAGES_PER_CLUSTER = 768, 64, 20
IMAGE_NOISE, QUERY_NOISE = 1.5, 2.0  # norm of the noise added to a unit centre
SEED, K = 0, 10
GOAL_RECALL, GOAL_SPEEDUP = 0.98, 10.0
#: Latency that `auto` still accepts from exact search for one query (an interactive page on this machine).
EXACT_LATENCY_BUDGET_S = 0.1
SIZES = {"10k": 10_000, "30k": 30_000, "100k": 100_000, "1m": 1_000_000}


def clustered_embeddings(num_rows: int, num_queries: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(num_rows, DIM) gallery and (num_queries, DIM) queries, L2-normalised float32 (see the module docstring)."""
    rng = np.random.default_rng(seed)
    num_clusters = max(1, num_rows // IMAGES_PER_CLUSTER)
    projection = rng.standard_normal((LATENT, DIM), dtype=np.float32) / np.sqrt(LATENT)
    centres = rng.standard_normal((num_clusters, LATENT), dtype=np.float32) @ projection
    centres += 0.5 * rng.standard_normal((num_clusters, DIM), dtype=np.float32) / np.sqrt(DIM)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def around(labels: np.ndarray, noise: float) -> np.ndarray:
        x = centres[labels] + noise * rng.standard_normal((len(labels), DIM), dtype=np.float32) / np.sqrt(DIM)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    gallery = np.empty((num_rows, DIM), dtype=np.float32)
    labels = rng.integers(0, num_clusters, num_rows)
    for start in range(0, num_rows, 65_536):  # bounded temporaries: the gallery is the only big array
        gallery[start : start + 65_536] = around(labels[start : start + 65_536], IMAGE_NOISE)
    return gallery, around(rng.integers(0, num_clusters, num_queries), QUERY_NOISE)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def _built(build: Callable[[], Ranker]) -> tuple[Ranker, float, float]:
    """The engine, its build seconds and the resident GB it added."""
    gc.collect()
    before, start = _status_kb("VmRSS"), time.perf_counter()
    ranker = build()
    return ranker, time.perf_counter() - start, (_status_kb("VmRSS") - before) / 2**20


def _throughput(ranker: Ranker, queries: torch.Tensor, single: int) -> tuple[float, float, np.ndarray]:
    """Queries/s one at a time (the first `single` queries), queries/s all in one call, and that call's rows."""
    ranker.search(queries[:1], K)  # warm-up
    start = time.perf_counter()
    for i in range(single):
        ranker.search(queries[i : i + 1], K)
    one = single / (time.perf_counter() - start)
    start = time.perf_counter()
    _, rows = ranker.search(queries, K)
    return one, len(queries) / (time.perf_counter() - start), rows


def recall(rows: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k found in its approximate top-k."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows.tolist(), exact.tolist())]))


def measure(name: str, num_rows: int, num_queries: int, single: int) -> dict:
    """Every engine at one size; the IVF index uses what `IVFParams.for_size` chooses."""
    _reset_peak()
    start = time.perf_counter()
    gallery, query_array = clustered_embeddings(num_rows, num_queries)
    queries = torch.from_numpy(query_array)
    out = {"size": name, "rows": num_rows, "queries": num_queries, "generate_s": time.perf_counter() - start}
    out["gallery_gb"] = gallery.nbytes / 2**30

    matmul = MatmulRanker(torch.from_numpy(gallery))  # shares the array: today's engine adds nothing
    one, batch, exact = _throughput(matmul, queries, single)
    out["matmul"] = {"single_qps": one, "batch_qps": batch, "build_s": 0.0, "memory_gb": 0.0}
    print(f"[{name}] matmul: {one:.1f} q/s single, {batch:.1f} q/s batch", flush=True)

    flat, build_s, memory = _built(lambda: flat_ranker(gallery))
    one, batch, rows = _throughput(flat, queries, single)
    out["faiss-flat"] = {
        "single_qps": one,
        "batch_qps": batch,
        "build_s": build_s,
        "memory_gb": memory,
        "recall_at_10": recall(rows, exact),
        "same_top_k": float(np.mean(np.all(rows == exact, axis=1))),
    }
    print(f"[{name}] faiss-flat: {one:.1f} q/s single, {batch:.1f} q/s batch", flush=True)
    del flat
    gc.collect()

    params = IVFParams.for_size(num_rows)
    timings = {}

    def build_ivf() -> Ranker:
        start = time.perf_counter()
        trained = train_ivf(gallery, params)
        timings["train_s"] = time.perf_counter() - start
        lists = assign_lists(trained, gallery)
        timings["assign_s"] = time.perf_counter() - start - timings["train_s"]
        return ivf_ranker(trained, gallery, lists, params.nprobe)

    ivf, build_s, memory = _built(build_ivf)
    one, batch, rows = _throughput(ivf, queries, single)
    out["faiss-ivf"] = {
        "single_qps": one,
        "batch_qps": batch,
        "build_s": build_s,
        **timings,
        "memory_gb": memory,
        "recall_at_10": recall(rows, exact),
        "params": params.as_record(),
        "sweep": [],
    }
    print(f"[{name}] faiss-ivf {params}: {one:.1f} q/s single, recall {out['faiss-ivf']['recall_at_10']:.4f}")
    for nprobe in sorted({max(1, params.nlist // d) for d in (64, 32, 16, 8, 4)}):
        ivf.index.nprobe = nprobe
        start = time.perf_counter()
        _, rows = ivf.search(queries, K)
        sweep = {"nprobe": nprobe, "batch_qps": num_queries / (time.perf_counter() - start)}
        out["faiss-ivf"]["sweep"].append({**sweep, "recall_at_10": recall(rows, exact)})
    out["peak_rss_gb"] = _status_kb("VmHWM") / 2**20
    return out


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "CPU",
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores (shared with other work), {memory:.0f} GB RAM; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads, "
        f"{faiss.get_num_gpus()} GPU)"
    )


def exact_limit(results: list[dict]) -> int:
    """Rows at which exact faiss search of one query reaches EXACT_LATENCY_BUDGET_S, from the largest size
    measured (exact search cost is linear in the rows).
    """
    largest = max(results, key=lambda r: r["rows"])
    return int(EXACT_LATENCY_BUDGET_S * largest["faiss-flat"]["single_qps"] * largest["rows"])


def markdown(results: list[dict], described: str, when: str) -> str:
    lines = [
        "# Gallery search at scale (cpu)",
        "",
        f"{described}; {when}.",
        f"Synthetic clustered 768-d L2-normalised float32 embeddings (seed {SEED}); recall@10 against exact search "
        f"(matmul); single = one query per call (the web page), batch = {results[0]['queries']} queries in one call.",
        "",
        "| rows | engine | single q/s | batch q/s | single vs matmul | batch vs matmul | recall@10 | build | memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r["matmul"]
        for engine in ("matmul", "faiss-flat", "faiss-ivf"):
            e = r[engine]
            build = (
                f"{e['build_s']:.1f} s"
                if engine != "faiss-ivf"
                else (f"{e['build_s']:.1f} s (train {e['train_s']:.1f}, assign {e['assign_s']:.1f})")
            )
            lines.append(
                f"| {r['rows']:,} | {engine} | {e['single_qps']:.1f} | {e['batch_qps']:.1f} | "
                f"{e['single_qps'] / base['single_qps']:.1f}x | {e['batch_qps'] / base['batch_qps']:.1f}x | "
                f"{e.get('recall_at_10', 1.0):.4f} | {build} | {e['memory_gb']:.2f} GB |"
            )
    lines += ["", "IVF parameters (what the index chooses) and the nprobe sweep (batch q/s, recall@10):", ""]
    for r in results:
        p = r["faiss-ivf"]["params"]
        sweep = ", ".join(
            f"{s['nprobe']}: {s['batch_qps']:.0f} q/s, {s['recall_at_10']:.4f}" for s in r["faiss-ivf"]["sweep"]
        )
        lines.append(
            f"- {r['rows']:,} rows: nlist {p['nlist']}, nprobe {p['nprobe']}, {p['train_size']:,} training rows, "
            f"{p['niter']} k-means iterations, seed {p['seed']}; sweep {sweep}. Gallery {r['gallery_gb']:.2f} GB, "
            f"process peak {r['peak_rss_gb']:.2f} GB."
        )
    lines += ["", "Goals:", ""]
    for r in results:
        if r["rows"] < 100_000:
            continue
        ivf, base = r["faiss-ivf"], r["matmul"]
        ok_recall = ivf["recall_at_10"] >= GOAL_RECALL
        lines.append(
            f"- {r['rows']:,} rows: recall@10 {ivf['recall_at_10']:.4f} (goal >= {GOAL_RECALL}: "
            f"{'met' if ok_recall else 'MISSED'}); speed-up over matmul {ivf['single_qps'] / base['single_qps']:.1f}x "
            f"single, {ivf['batch_qps'] / base['batch_qps']:.1f}x batch"
            + (
                f" (goal >= {GOAL_SPEEDUP:.0f}x at 1M: single "
                f"{'met' if ivf['single_qps'] / base['single_qps'] >= GOAL_SPEEDUP else 'MISSED'}, batch "
                f"{'met' if ivf['batch_qps'] / base['batch_qps'] >= GOAL_SPEEDUP else 'MISSED'})"
                if r["rows"] >= 1_000_000
                else ""
            )
            + "."
        )
    lines += [
        "",
        f"Exact faiss search answers one query within {EXACT_LATENCY_BUDGET_S * 1000:.0f} ms up to about "
        f"{exact_limit(results):,} rows here (linear in the rows); `auto` uses faiss-flat up to {EXACT_UP_TO:,}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--queries", type=int, default=500, help="queries per size (batch)")
    parser.add_argument("--single", type=int, default=20, help="queries timed one per call")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and faiss threads (the machine is shared: 1 gives stable ratios)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search_scale_cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    results = [measure(name, SIZES[name], args.queries, args.single) for name in args.sizes]
    described, when = machine(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_json(args.out.with_suffix(".json"), {"machine": described, "date": when, "results": results})
    atomic_write_text(args.out.with_suffix(".md"), markdown(results, described, when))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
