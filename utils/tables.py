"""Console tables of retrieval results (the `Task | R1 | R5 | R10 | mAP | mINP` layout of the field)."""

from __future__ import annotations

from collections.abc import Mapping

from prettytable import PrettyTable

METRIC_COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")


def results_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Render `{"t2i": {"R1": ...}, "i2t": {...}}` with two decimals."""
    table = PrettyTable(["Task", *METRIC_COLUMNS])
    for task, metrics in results.items():
        table.add_row([task, *(f"{metrics[column]:.2f}" for column in METRIC_COLUMNS)])
    return table.get_string()
