"""Which link of the GLM predictive, if any, makes the Laplace predictive beat its own MAP: the
probit, Monte-Carlo and the two Laplace bridges on a finished study's runs (issue 18; results in
docs/study.md, fifth round):

    python benchmarks/link_approx.py STUDY_FOLDER [--cells default_full_test/long ...]
        [--links probit mc bridge bridge_norm] [--json OUT.json]
    python benchmarks/link_approx.py --from_json A.json B.json   # the table of earlier outputs

- ``--marglik`` runs (``marglik-seed*``): the posterior the run saved, over its own
  ``predictive_subset_of_weights``; per link the predictive's prior tuned on the validation
  split as the trainer does (:func:`hf_marglik.tuning.tune_predictive_prior`, the learned
  precisions times a factor by validation NLL under that link).
- plain runs (``plain-wd*``): a post-hoc last-layer K-FAC Laplace (the head; laplace-torch's
  default post-hoc Laplace) fitted on the training split with the config's curvature; per link a
  scalar prior precision from ``logspace(-4, 4, 100)`` by validation NLL under that link (the
  study's ``posthoc_laplace_last_layer_gridsearch`` for the probit).

The test Jacobians are computed once per run and serve every link. Prints, per cell, run kind
and link, the mean ± std over seeds of accuracy, NLL, ECE and the ECE floor (the mean ECE that
perfect calibration with the same confidences shows on this test split, benchmarks/ece_floor.py,
500 draws) and the paired differences (same seed) against the run's MAP. The bridge's prediction does not tend to the MAP's as the prior
grows (it is invariant to a scaling of the covariance), so its grid matters little.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import offline_environment, setup_process  # noqa: E402
from ece_floor import floor  # noqa: E402

LINKS = ("probit", "mc", "bridge", "bridge_norm")
METRICS = ("accuracy", "nll", "ece", "ece_floor")


def _load(run_dir: Path):
    """``(cfg, prep, model, lap)`` of a finished run, rebuilt from its record's flags."""
    from transformers.utils import logging as hf_logging

    from hf_marglik.recipe.config import parse_args
    from hf_marglik.recipe.run import load_trained, prepare

    argv = json.loads((run_dir / "study_run.json").read_text())["argv"][2:]
    keep, skip = [], False
    for a in argv:  # the record's own --output_dir is replaced by the folder found
        if skip:
            skip = False
        elif a == "--output_dir":
            skip = True
        else:
            keep.append(a)
    if "--marglik" not in keep:  # a plain run: the config's curvature settings for the fit
        keep.append("--marglik")
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = parse_args([*keep, "--output_dir", str(run_dir)])
    prep = prepare(cfg)
    hf_logging.set_verbosity_error()
    model, lap = load_trained(cfg, prep, run_dir)
    return cfg, prep, model, lap


def _loader(prep, split: str, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(prep.encoded[split], batch_size=batch_size, collate_fn=prep.collator)


def _posthoc_last_layer(cfg, prep, model):
    from hf_marglik import Laplace

    t = cfg.training
    lap = Laplace(
        model,
        "classification",
        hessian_structure="kron",
        backend=t.backend,
        kfac_approx=t.kfac_approx,
        n_mc_samples=t.n_mc_samples,
        prior_precision=1.0,
        seed=t.seed,
        subset_of_weights="last_layer",
    )
    lap.fit(_loader(prep, "train", t.per_device_train_batch_size))
    return lap


class _TestMoments:
    """The test split's MAP logits and a covariance function per batch (prior -> J Σ Jᵀ)."""

    def __init__(self, lap, loader):
        from hf_marglik.predictive import glm_covariance_fn, glm_jacobians

        self.batches, labels = [], []
        for batch in loader:
            y = batch["labels"]
            logits, jac = glm_jacobians(lap, {k: v for k, v in batch.items() if k != "labels"})
            fn = glm_covariance_fn(lap, jac, *logits.shape)
            self.batches.append((logits.detach(), fn))
            labels.append(y)
        self.labels = torch.cat(labels)

    def map_logits(self) -> torch.Tensor:
        return torch.cat([lg for lg, _ in self.batches])

    def probs(self, link: str, seed: int) -> torch.Tensor:
        from hf_marglik.predictive import categorical

        gen = torch.Generator().manual_seed(seed)
        return torch.cat(
            [categorical(lg, fn(), link, 100, gen).detach().double() for lg, fn in self.batches]
        )


FLOOR_DRAWS = 500


def _with_floor(metrics: dict, probs: torch.Tensor, seed: int) -> dict:
    """``metrics`` and ``ece_floor``: the mean ECE of ``probs`` against labels drawn from them
    (benchmarks/ece_floor.py, :data:`FLOOR_DRAWS` draws)."""
    mean, _ = floor(probs, FLOOR_DRAWS, torch.Generator().manual_seed(seed))
    return {**metrics, "ece_floor": mean}


def evaluate_run(run_dir: Path, links) -> dict:
    from hf_marglik import calibration_metrics
    from hf_marglik.tuning import tune_predictive_prior

    cfg, prep, model, lap = _load(run_dir)
    t = cfg.training
    marglik = lap is not None
    if not marglik:
        lap = _posthoc_last_layer(cfg, prep, model)
    val = _loader(prep, "validation", t.per_device_eval_batch_size)
    test = _TestMoments(lap, _loader(prep, "test", t.per_device_eval_batch_size))
    keep = test.labels != -100
    y = test.labels[keep]
    map_probs = torch.softmax(test.map_logits().double(), -1)[keep]
    out = {
        "kind": "marglik" if marglik else "plain",
        "map": _with_floor(calibration_metrics(map_probs, y), map_probs, t.seed),
        "links": {},
    }
    for link in links:
        if marglik:
            lap.predictive_prior_precision = None
            tuned = tune_predictive_prior(lap, val, "glm", link, 100)
        else:
            lap.prior_precision = 1.0
            lap.optimize_prior_precision(
                pred_type="glm", method="gridsearch", val_loader=val, link_approx=link
            )
            tuned = float(lap.prior_precision.mean())
        probs = test.probs(link, t.seed)[keep]
        metrics = _with_floor(calibration_metrics(probs, y), probs, t.seed)
        out["links"][link] = {"test": metrics, "prior": tuned}
    return out


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def table(results: dict) -> str:
    """Markdown: per cell, kind and link, mean ± std over seeds and paired − MAP."""
    rows = defaultdict(list)  # (cell, kind) -> [per-run results]
    for (cell, _seed), r in sorted(results.items()):
        rows[(cell, r["kind"])].append(r)
    lines = [
        "| cell | run | predictive | seeds | accuracy | NLL | ECE | ECE floor | "
        "paired NLL − MAP | paired ECE − MAP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (cell, kind), runs in rows.items():
        n = len(runs)
        m = {k: [r["map"][k] for r in runs] for k in METRICS}
        lines.append(
            f"| {cell} | {kind} | MAP | {n} | "
            + " | ".join(_mean_std(m[k]) for k in METRICS)
            + " | | |"
        )
        for link in runs[0]["links"]:
            v = {k: [r["links"][link]["test"][k] for r in runs] for k in METRICS}
            d = {k: [a - b for a, b in zip(v[k], m[k])] for k in ("nll", "ece")}
            lines.append(
                f"| {cell} | {kind} | {link} | {n} | "
                + " | ".join(_mean_std(v[k]) for k in METRICS)
                + f" | {_mean_std(d['nll'])} | {_mean_std(d['ece'])} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, nargs="?", default=None)
    p.add_argument(
        "--from_json",
        nargs="+",
        type=Path,
        default=None,
        help="Print the table of earlier --json outputs (merged) instead of computing.",
    )
    p.add_argument("--cells", nargs="+", default=None, help="task/regime (default: all).")
    p.add_argument("--links", nargs="+", default=list(LINKS), choices=LINKS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="Also write the per-run results.")
    a = p.parse_args(argv)
    if a.from_json:
        results = {}
        for path in a.from_json:
            for key, value in json.loads(path.read_text()).items():
                cell, run = key.rsplit("/", 1)
                results[(cell, run)] = value
        print(table(results))
        return 0
    if a.study is None:
        p.error("give a STUDY_FOLDER or --from_json")
    offline_environment()
    setup_process(a.threads)
    results = {}
    for record in sorted(a.study.glob("*/*/runs/*/study_run.json")):
        run_dir = record.parent
        cell = "/".join(run_dir.parts[-4:-2])
        if a.cells and cell not in a.cells:
            continue
        if not (run_dir.name.startswith("plain-") or run_dir.name.startswith("marglik-")):
            continue
        seed = int(run_dir.name.rsplit("seed", 1)[1])
        print(f"{cell} {run_dir.name} ...", file=sys.stderr, flush=True)
        results[(cell, f"{run_dir.name}")] = {"seed": seed, **evaluate_run(run_dir, a.links)}
    if not results:
        print(
            f"link_approx.py: no finished plain or --marglik runs under {a.study}", file=sys.stderr
        )
        return 2
    print(table(results))
    if a.json:
        a.json.write_text(
            json.dumps({f"{c}/{r}": v for (c, r), v in results.items()}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
