"""What a comparison study (:mod:`hf_marglik.recipe.study`) writes beside its runs:
``study.json`` (every run and job, the aggregated cells), ``table.md`` and PNG figures
(matplotlib, Agg backend) in ``figures/``:

- ``<task>-<regime>-metrics.png``: one panel per metric (accuracy, NLL, ECE, Brier), a bar per
  arm at the mean over seeds, error bars ± one standard deviation, the seeds as dots.
- ``<task>-<regime>-reliability.png``: reliability diagrams of the test predictions pooled over
  seeds, one panel per arm (the MAP arms against the Laplace predictives): accuracy per bin of
  15 equal-width confidence bins against the diagonal, with the pooled ECE.

All three are derived from the recorded runs and rewritten by every invocation (atomically);
the runs themselves are never touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .study import (
    ARMS,
    FIGURES_DIR,
    METRICS,
    RESULTS_NAME,
    TABLE_NAME,
    SeedView,
    Study,
)

N_BINS = 15
NAMES = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE", "brier": "Brier"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(summary: dict, digits: int = 3, sign: bool = False) -> str:
    if summary["mean"] is None:
        return "–"
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(summary["mean"], spec)
    if summary["std"] is not None:
        text += f" ± {summary['std']:.{digits}f}"
    return text


def _per_seed(summary: dict, digits: int = 3) -> str:
    return ", ".join(f"s{s} {v:+.{digits}f}" for s, v in sorted(summary["per_seed"].items()))


def _figure_name(cell: dict, kind: str) -> str:
    return f"{cell['task']}-{cell['regime']}-{kind}.png"


def cell_table(cell: dict) -> str:
    """The Markdown section of one task × regime cell."""
    arms = cell["arms"]
    lines = [
        f"## {cell['task']} task · {cell['regime']} regime",
        "",
        f"{cell['task_description']}; {cell['regime_description']}. Seeds "
        f"{', '.join(map(str, cell['seeds']))}. `scripts/train.py` flags: "
        f"`{' '.join(cell['train_args'])}` (plus each arm's own).",
        "",
        "| arm | accuracy | NLL | ECE | Brier | training CPU s | run CPU s | run wall s | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms.values():
        c = a["compute"]
        n = a["metrics"]["nll"]["n"]
        missing = (
            f" (missing {', '.join(map(str, a['missing_seeds']))})" if a["missing_seeds"] else ""
        )
        lines.append(
            f"| {a['label']} | "
            + " | ".join(_fmt(a["metrics"][m]) for m in METRICS)
            + f" | {_fmt(c['train_cpu_s'], 0)} | {_fmt(c['cpu_s'], 0)} | {_fmt(c['wall_s'], 0)}"
            + f" | {n}{missing} |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds (sample std; none for one seed); compute per seed "
        "(the grid: all its runs; post-hoc arms: their run plus the post-hoc work).",
    ]
    if cell["paired"]:
        lines += [
            "",
            "Paired differences, same seed (mean ± std; per seed):",
            "",
            "| difference | " + " | ".join(NAMES[m] for m in METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        for key, diff in cell["paired"].items():
            a, b = key.split(" - ")
            label = f"{arms[a]['label']} − {arms[b]['label']}"
            cells = [f"{_fmt(diff[m], 4, sign=True)} ({_per_seed(diff[m], 4)})" for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    grid = arms.get("grid")
    if grid and grid["per_seed"]:
        choices = ", ".join(
            f"seed {s}: wd {r['details']['chosen_weight_decay']:g}"
            for s, r in sorted(grid["per_seed"].items())
        )
        lines += ["", f"Grid choice by validation NLL: {choices}."]
    t = cell["target"]
    lines += [
        "",
        f"**Target ({t['status']})**: {t['statement']}. {t.get('reason', '')}",
        "",
        f"![metrics]({FIGURES_DIR}/{_figure_name(cell, 'metrics')})",
        f"![reliability]({FIGURES_DIR}/{_figure_name(cell, 'reliability')})",
        "",
    ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """``table.md``: the verdicts first, then one section per cell."""
    lines = [
        "# Comparison study",
        "",
        f"`{results['out']}`, written {results['generated']}: arms {', '.join(results['arms'])}; "
        f"seeds {', '.join(map(str, results['seeds']))}; weight-decay grid "
        f"{', '.join(f'{w:g}' for w in results['settings']['wd_grid'])}. "
        f"{len(results['runs'])} training runs and {len(results['jobs'])} post-hoc jobs recorded.",
        "",
        "## Targets",
        "",
        "| task | regime | target | verdict |",
        "|---|---|---|---|",
    ]
    for cell in results["cells"]:
        t = cell["target"]
        lines.append(
            f"| {cell['task']} | {cell['regime']} | {t['statement']} | **{t['status']}**: {t.get('reason', '')} |"
        )
    lines.append("")
    lines += [cell_table(cell) for cell in results["cells"]]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_figure(cell: dict, path: Path) -> Path:
    """Bars (mean), error bars (± std) and dots (seeds) per arm, one panel per metric."""
    plt = _plt()
    arms = [a for a in cell["arms"].values() if a["per_seed"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], METRICS):
        for i, a in enumerate(arms):
            s = a["metrics"][m]
            ax.bar(
                i,
                s["mean"],
                yerr=s["std"] or 0,
                color=colors[i % len(colors)],
                alpha=0.7,
                capsize=4,
            )
            values = list(s["per_seed"].values())
            ax.plot([i] * len(values), values, "k.", ms=5)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([a["label"] for a in arms], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"test {NAMES[m]}")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{cell['task']} task · {cell['regime']} regime (mean ± std over seeds; dots: seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_bins(probs, labels, n_bins: int = N_BINS) -> dict:
    """Per equal-width bin of the top-class confidence: count, mean confidence, accuracy; and
    the ECE ``Σ_b (n_b / n) |acc_b − conf_b|``."""
    import torch

    probs, labels = probs.double(), labels.long()
    keep = labels != -100
    conf, pred = probs[keep].max(-1)
    hit = (pred == labels[keep]).double()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    hit_sum = torch.bincount(bins, weights=hit, minlength=n_bins)
    safe = count.clamp_min(1)
    ece = float((conf_sum - hit_sum).abs().sum() / max(int(keep.sum()), 1))
    return {
        "count": count.tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (hit_sum / safe).tolist(),
        "ece": ece,
    }


def reliability_figure(study: Study, cell_index: int, cell: dict, path: Path) -> Path | None:
    """One reliability diagram per arm with test probabilities, seeds pooled."""
    import torch

    c = study.cells[cell_index]
    panels = []
    for name in study.arms:
        probs, labels = [], []
        for seed in cell["arms"][name]["per_seed"]:
            got = ARMS[name].test_probs(SeedView(study.out, c, int(seed), study.settings))
            if got is not None:
                probs.append(got[0])
                labels.append(got[1])
        if probs:
            panels.append(
                (
                    cell["arms"][name]["label"],
                    reliability_bins(torch.cat(probs), torch.cat(labels)),
                    len(probs),
                )
            )
    if not panels:
        return None
    plt = _plt()
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    width = 1.0 / N_BINS
    centres = [(i + 0.5) * width for i in range(N_BINS)]
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (label, b, n) in zip(axes.flat, panels):
        filled = [i for i in range(N_BINS) if b["count"][i] > 0]
        ax.bar([centres[i] for i in filled], [b["accuracy"][i] for i in filled], width=width,
               edgecolor="black", color="tab:blue", alpha=0.7, label="accuracy")  # fmt: skip
        ax.plot([b["confidence"][i] for i in filled], [b["confidence"][i] for i in filled], "r.",
                ms=6, label="mean confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(
            f"{label}\nECE {b['ece']:.3f} ({n} seed{'s' if n > 1 else ''} pooled)", fontsize=9
        )
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{cell['task']} task · {cell['regime']} regime: reliability on the test split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, study: Study) -> dict[str, str]:
    """Write ``study.json``, ``table.md`` and the figures; return their paths. A figure of a
    cell without any finished arm is not drawn."""
    out = study.out
    figures = out / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    files = {}
    for i, cell in enumerate(results["cells"]):
        if not any(a["per_seed"] for a in cell["arms"].values()):
            continue
        for kind, draw in (
            ("metrics", lambda p, c=cell: metrics_figure(c, p)),
            ("reliability", lambda p, i=i, c=cell: reliability_figure(study, i, c, p)),
        ):
            path = figures / _figure_name(cell, kind)
            tmp = path.with_name(path.stem + ".tmp.png")
            if draw(tmp) is not None:
                os.replace(tmp, path)
                files[f"{cell['task']}/{cell['regime']}/{kind}"] = str(path)
    results["figures"] = files
    _atomic_write(out / RESULTS_NAME, json.dumps(results, indent=2, default=str))
    _atomic_write(out / TABLE_NAME, markdown(results))
    files["results"], files["table"] = str(out / RESULTS_NAME), str(out / TABLE_NAME)
    return files
