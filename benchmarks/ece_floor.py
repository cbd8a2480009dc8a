"""How low an ECE the study's test split can show: the ECE floor of each arm's predictions
(docs/study.md, fourth round, "The ECE floor of the default task's long regime"):

    python benchmarks/ece_floor.py STUDY_FOLDER [STUDY_FOLDER ...] [--draws 2000] [--seed 0]

ECE (15 equal-width bins, as the runs report it) is an estimate from ``n`` test examples; a
perfectly calibrated predictor has ECE 0 in expectation over infinitely many examples, not on
``n``. For each arm's test probabilities ``p`` this script draws labels ``y ~ Categorical(p)``
(``--draws`` times): the predictions are then calibrated by construction, so the mean ECE over
draws is the ECE that perfect calibration with these confidences would show on ``n`` examples
(the floor), and its 95% quantile the largest such ECE that seed noise gives. It also gives the
bootstrap standard error of the observed ECE (examples resampled with replacement), the accuracy
and the mean confidence (top-class probability) minus the accuracy: positive for an
overconfident predictor, negative for an underconfident one.

Reads every run of the folders (``runs/*/predictions.*``: the MAP and, for ``--marglik`` runs,
the Laplace predictive) and every post-hoc job (``posthoc/*/probs.pt``: each variant). Prints one
row per (cell, arm) with the mean over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_marglik.columns import sample_categorical  # noqa: E402
from hf_marglik.metrics import calibration_metrics  # noqa: E402


def ece(probs: torch.Tensor, y: torch.Tensor) -> float:
    return calibration_metrics(probs, y)["ece"]


def floor(probs: torch.Tensor, draws: int, gen: torch.Generator) -> tuple[float, float]:
    """Mean and 95% quantile of the ECE of ``probs`` against labels drawn from ``probs``."""
    values = []
    for _ in range(draws):
        y = sample_categorical(probs, gen).squeeze(-1)
        values.append(ece(probs, y))
    values.sort()
    return statistics.fmean(values), values[int(0.95 * (len(values) - 1))]


def bootstrap_se(probs: torch.Tensor, y: torch.Tensor, draws: int, gen) -> float:
    n = len(y)
    values = []
    for _ in range(draws):
        i = torch.randint(0, n, (n,), generator=gen)
        values.append(ece(probs[i], y[i]))
    return statistics.stdev(values)


def predictions(folder: Path):
    """``(cell, arm, seed, probs, labels)`` of every run and job under ``folder``."""
    from hf_marglik.recipe.report import load_predictions

    runs = {p.parent for pattern in ("predictions.json", "predictions.pt")
            for p in folder.glob(f"*/*/runs/*/{pattern}")}  # fmt: skip
    for path in sorted(runs):
        cell = "/".join(path.parts[-4:-2])
        run, seed = path.name.rsplit("-seed", 1)
        p = load_predictions(path)
        labels = p["test"]["labels"]
        yield cell, f"{run} MAP", int(seed), torch.softmax(p["test"]["logits"].double(), -1), labels
        if p.get("test_laplace"):
            yield cell, f"{run} Laplace", int(seed), p["test_laplace"]["probs"], labels
    for path in sorted(folder.glob("*/*/posthoc/*/probs.pt")):
        cell = "/".join(path.parts[-5:-3])
        job, seed = path.parent.name.rsplit("-seed", 1)
        tensors = torch.load(path, weights_only=False)
        for name, probs in tensors.items():
            if name != "labels":
                yield cell, f"{job} {name}", int(seed), probs, tensors["labels"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    rows = defaultdict(list)
    for folder in args.folders:
        for cell, arm, seed, probs, y in predictions(folder):
            keep = y != -100
            probs, y = probs[keep].double(), y[keep]
            f_mean, f_q95 = floor(probs, args.draws, gen)
            rows[(cell, arm)].append(
                (
                    seed,
                    ece(probs, y),
                    f_mean,
                    f_q95,
                    bootstrap_se(probs, y, args.draws, gen),
                    float((probs.argmax(-1) == y).double().mean()),
                    float(probs.max(-1).values.mean() - (probs.argmax(-1) == y).double().mean()),
                    len(y),
                )
            )
    print(
        "| cell | arm | seeds | n test | observed ECE | floor (calibrated, same confidences) "
        "| floor 95% | bootstrap s.e. | accuracy | confidence − accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (cell, arm), r in sorted(rows.items()):
        m = [statistics.fmean(x[i] for x in r) for i in range(1, 7)]
        print(
            f"| {cell} | {arm} | {len(r)} | {r[0][7]} | "
            + " | ".join(f"{v:.3f}" for v in m[:5])
            + f" | {m[5]:+.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
