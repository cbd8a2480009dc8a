"""A PNG of a training run: the loss, the log marginal likelihood and the prior precisions.

Read from the Trainer's ``state.log_history`` (``loss``, ``eval_loss``, ``marglik``,
``prior_prec/<tensor>``) and, for the hyper-steps, from ``MargLikTrainer.margliks``.
"""

from __future__ import annotations

from pathlib import Path


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(h["step"], h[key]) for h in history if key in h]
    return [s for s, _ in rows], [v for _, v in rows]


def _group(name: str) -> str:
    for key in ("lora_A", "lora_B"):
        if key in name:
            return key
    return "head / other"


def plot_training(
    history: list[dict],
    path: str | Path,
    neg_log_margliks: list[float] | None = None,
    title: str = "",
) -> Path:
    """Write the figure to ``path``: one panel for a plain run, three with marglik logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_marglik = any("marglik" in h for h in history)
    n_panels = 3 if has_marglik else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 4.0), squeeze=False)
    axes = axes[0]

    ax = axes[0]
    steps, values = _series(history, "loss")
    ax.plot(steps, values, label="training loss", color="tab:blue")
    steps, values = _series(history, "eval_loss")
    if steps:
        ax.plot(steps, values, "o-", label="validation NLL", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per data point")
    ax.set_title("Loss" + (" (training: NLL + prior term)" if has_marglik else ""))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)

    if has_marglik:
        ax = axes[1]
        steps, values = _series(history, "marglik")
        if neg_log_margliks:
            per_update = max(1, len(neg_log_margliks) // max(len(steps), 1))
            xs = [i / per_update for i in range(1, len(neg_log_margliks) + 1)]
            ax.plot(
                xs, [-v for v in neg_log_margliks], color="tab:green", lw=1, label="hyper-steps"
            )
        ax.plot(range(1, len(values) + 1), values, "o", color="tab:green", label="after update")
        ax.set_xlabel("marglik update (new Laplace fit)")
        ax.set_ylabel("log marginal likelihood")
        ax.set_title("Laplace log marginal likelihood")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)

        ax = axes[2]
        keys = sorted({k for h in history for k in h if k.startswith("prior_prec/")})
        colors = {"lora_A": "tab:purple", "lora_B": "tab:red", "head / other": "tab:brown"}
        seen = set()
        for key in keys:
            steps, values = _series(history, key)
            group = _group(key)
            ax.plot(
                steps,
                values,
                "-",
                lw=0.8,
                alpha=0.6,
                color=colors[group],
                label=None if group in seen else group,
            )
            seen.add(group)
        steps, values = _series(history, "prior_prec_mean")
        ax.plot(steps, values, "o-", color="black", lw=2, label="mean")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("prior precision")
        ax.set_title("Learned prior precisions (per tensor)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
