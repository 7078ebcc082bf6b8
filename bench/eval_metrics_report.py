"""The eval_metrics benchmark's report: its markdown table and the goal's verdict per row."""

from __future__ import annotations

TOLERANCE = 1e-9  # percentage points: both methods' metrics must agree this closely to count as identical

# Goal of the issue, checked at these sizes for both kinds of scores: at least 10x faster, at most 10% of the
# reference's extra peak memory, identical metrics.
GOAL_SIZES = ("12k", "icfg")
GOAL_SPEEDUP, GOAL_MEMORY_RATIO = 10.0, 0.10


def markdown(report: dict) -> str:
    """Render the report as a markdown table with the settings and the goal verdicts."""
    settings, device = report["settings"], report["settings"]["device"]
    lines = [
        f"# rank_metrics vs full-sort reference ({settings['device']})",
        "",
        f"{settings['device_name']}; torch {settings['torch']}; threads {settings['threads']}; "
        f"best of {settings['repeats']} run(s); rank_metrics budget {settings['memory_budget']}; {settings['date']}.",
        "Extra peak = peak memory above what existed once the similarity matrix was built "
        f"({'VmHWM' if device == 'cpu' else 'torch.cuda.max_memory_allocated'}). "
        f"Identical = every metric within {TOLERANCE:g} percentage points. {_timing_note(device)} "
        "Scores: realistic = a trained model's, "
        "float16 grid; random = standard normal (an untrained model). Above lowest relevant = entries scoring at "
        "least their query's lowest relevant score.",
        "",
        "| size | scores | Q x G | similarity | reference | rank_metrics | speed-up | reference extra peak | "
        "rank_metrics extra peak | memory ratio | identical (max diff) | R1 / mAP / mINP | above lowest relevant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ref, ours, cmp = row["reference"], row["rank_metrics"], row["comparison"]
        metrics = ours.get("metrics") or ref.get("metrics")
        lines.append(
            f"| {row['label']} | {row['scores']} | {row['queries']:,} x {row['gallery']:,} "
            f"| {_gb(row['queries'] * row['gallery'] * 4)} "
            f"| {_seconds(ref, device)} | {_seconds(ours, device)} | {_speedup(cmp)} | {_peak(ref)} | {_peak(ours)} "
            f"| {_percent(cmp['memory_ratio'])} | {_identical(cmp)} "
            f"| {_triple(metrics)} | {_fraction(ours.get('candidate_fraction'))} |"
        )
    lines += ["", *report["verdicts"], ""]
    return "\n".join(lines)


def _timing_note(device: str) -> str:
    if device != "cpu":
        return "Times are wall times."
    return (
        "Times: wall (CPU time, user + system); the speed-up is the ratio of CPU times (of wall times in brackets): "
        "other processes on shared cores stretch a run's wall time, not the CPU time it uses."
    )


def _seconds(result: dict, device: str) -> str:
    if "seconds" not in result:
        return result.get("skipped") or result["error"]
    cpu = f" ({result['cpu_seconds']:.2f} s)" if device == "cpu" else ""
    return f"{result['seconds']:.2f} s{cpu}"


def _speedup(comparison: dict) -> str:
    if comparison["speedup"] is None:
        return "-"
    if comparison["speedup"] == comparison["wall_speedup"]:  # CUDA: both are wall times
        return f"{comparison['speedup']:.1f}x"
    return f"{comparison['speedup']:.1f}x (wall {comparison['wall_speedup']:.1f}x)"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.0f} MB"


def _peak(result: dict) -> str:
    return _gb(result["extra_peak_bytes"]) if "extra_peak_bytes" in result else "-"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _identical(comparison: dict) -> str:
    if comparison["identical"] is None:
        return "-"
    return f"{'yes' if comparison['identical'] else 'NO'} ({comparison['max_abs_diff']:.1e})"


def _triple(metrics: dict | None) -> str:
    return "-" if metrics is None else f"{metrics['R1']:.1f} / {metrics['mAP']:.1f} / {metrics['mINP']:.1f}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def verdicts(rows: list[dict]) -> list[str]:
    """One line per row: the goal (at least 10x faster, at most 10% of the extra peak, identical), met or missed.

    The goal is set at ``GOAL_SIZES``; other rows say whether they would meet it.
    """
    goal = f">= {GOAL_SPEEDUP:g}x faster, <= {100 * GOAL_MEMORY_RATIO:g}% of the extra peak, identical"
    lines = []
    for row in rows:
        name, cmp = f"{row['label']}, {row['scores']} scores", row["comparison"]
        if cmp["speedup"] is None:
            lines.append(f"- {name} ({goal}): not measured (reference or rank_metrics did not run).")
            continue
        met = cmp["speedup"] >= GOAL_SPEEDUP and cmp["memory_ratio"] <= GOAL_MEMORY_RATIO and cmp["identical"]
        if row["size"] in GOAL_SIZES:
            verdict = "met" if met else "MISSED"
        else:
            verdict = f"not a goal size, would be {'met' if met else 'missed'}"
        same = "identical" if cmp["identical"] else "DIFFERENT"
        measured = f"{_speedup(cmp)}; {100 * cmp['memory_ratio']:.1f}% of the extra peak; {same}"
        lines.append(f"- {name} ({goal}): {verdict} ({measured}).")
    return lines
