"""The report: a table on stdout and in results.md, raw samples in results.json, a chart."""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any

from .common import Metric, fmt

HEADERS = ["benchmark", "unit", "torch", "elastic-timer", "speedup", "target", "verdict"]


def _speedup_text(metric: Metric) -> str:
    speedup = metric.speedup()
    if speedup is None:
        return "-"
    ratio, qualifier = speedup
    return f"{qualifier} {fmt(ratio)}x".strip()


def rows(metrics: list[Metric]) -> list[list[str]]:
    table = []
    for metric in metrics:
        table.append(
            [
                metric.title,
                metric.unit,
                metric.display("torch"),
                metric.display("ours"),
                _speedup_text(metric),
                metric.target.text if metric.target else "",
                metric.verdict(),
            ]
        )
    return table


def text_table(metrics: list[Metric]) -> str:
    table = [HEADERS, *rows(metrics)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
    right = {2, 3, 4}

    def line(row: list[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(row) for row in table[1:])])


def markdown(metrics: list[Metric], meta: dict[str, Any]) -> str:
    out = [
        "# elastic-timer vs torch.distributed.elastic.timer",
        "",
        f"`python benches/run.py{meta['arguments']}`: sizes `{meta['sizes']}`, "
        f"{meta['cpus']} CPUs, load average at start {meta['loadavg_start']}, "
        f"{meta['started']}, {meta['duration_s']:.0f} s; torch {meta['torch_version']}, "
        f"Python {meta['python']}.",
        "",
        "Figures are medians over repetitions (reap latency: percentiles over workers). "
        "Speedup is how many times better elastic-timer is: torch/ours for times and costs, "
        "ours/torch for rates. `>`: a lower bound (a measurement was cut off at its cap, or "
        "a figure is below the measurement's resolution).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---", "---", "---:", "---:", "---:", "---", "---"]) + "|",
    ]
    for row in rows(metrics):
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    out += ["", "## Notes", ""]
    for metric in metrics:
        if metric.notes:
            out.append(f"- **{metric.title}**: {metric.notes}")
    out.append("")
    return "\n".join(out)


def _clean(value: Any) -> Any:
    """JSON without Infinity/NaN: a censored sample (+inf) becomes null."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def as_json(metrics: list[Metric], meta: dict[str, Any]) -> str:
    entries = []
    for metric in metrics:
        speedup = metric.speedup()
        entries.append(
            {
                "family": metric.family,
                "key": metric.key,
                "title": metric.title,
                "unit": metric.unit,
                "stat": metric.stat,
                "better": metric.better,
                "samples": {"torch": metric.torch, "ours": metric.ours},
                "censored_at": {"torch": metric.torch_cap, "ours": metric.ours_cap},
                "summary": {"torch": metric.display("torch"), "ours": metric.display("ours")},
                "speedup": None if speedup is None else {"ratio": speedup[0], "bound": speedup[1]},
                "target": None if metric.target is None else vars(metric.target),
                "verdict": metric.verdict(),
                "notes": metric.notes,
                "raw": metric.raw,
            }
        )
    document = {
        "meta": meta,
        "note": "samples are in the metric's unit; null is a sample censored at its cap",
        "metrics": entries,
    }
    return json.dumps(_clean(document), indent=1)


def chart(metrics: list[Metric], path: str) -> None:
    """One horizontal bar per benchmark: the speedup, log scale, the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m.better != "none"]
    height = max(3.0, 0.42 * len(shown) + 1.5)
    figure, axes = plt.subplots(figsize=(11, height))
    colours = {"met": "#2e7d32", "MISSED": "#c62828", "?": "#f9a825", "": "#607d8b"}
    labels = []
    for y, metric in enumerate(shown):
        labels.append(textwrap.fill(metric.title, 46))
        speedup = metric.speedup()
        absolute = ""
        if metric.target is not None and metric.target.ours_max is not None:
            absolute = (
                f"  (ours {metric.display('ours')} {metric.unit}, "
                f"target {metric.target.text}: {metric.verdict()})"
            )
        if speedup is not None:
            ratio, qualifier = speedup
            axes.barh(y, ratio, color=colours[metric.verdict()], height=0.65)
            label = f"{qualifier}{fmt(ratio)}x{absolute}"
            axes.text(ratio * 1.08, y, label, va="center", fontsize=7)
        else:
            label = f"no torch figure{absolute}"
            axes.text(1.05, y, label, va="center", fontsize=7)
        if metric.target is not None and metric.target.min_speedup is not None:
            axes.plot(
                [metric.target.min_speedup] * 2,
                [y - 0.42, y + 0.42],
                color="black",
                linewidth=2,
            )
    axes.set_yticks(range(len(shown)))
    axes.set_yticklabels(labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ratios = [s[0] for s in (m.speedup() for m in shown) if s is not None]
    targets = [m.target.min_speedup for m in shown if m.target and m.target.min_speedup]
    top = max([10.0, *ratios, *targets]) * 30
    bottom = min([0.5, *ratios]) / 2
    axes.set_xlim(bottom, top)
    axes.set_xlabel(
        "speedup of elastic-timer over torch (x, log scale; black tick: target; "
        "green met, red missed, yellow inconclusive, grey no ratio target)",
        fontsize=8,
    )
    axes.set_title("elastic-timer vs torch.distributed.elastic.timer", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(metrics: list[Metric], meta: dict[str, Any], out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "md": os.path.join(out_dir, "results.md"),
        "json": os.path.join(out_dir, "results.json"),
        "png": os.path.join(out_dir, "results.png"),
    }
    with open(paths["md"], "w") as md:
        md.write(markdown(metrics, meta))
    with open(paths["json"], "w") as js:
        js.write(as_json(metrics, meta))
    chart(metrics, paths["png"])
    return paths
