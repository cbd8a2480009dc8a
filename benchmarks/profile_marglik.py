"""Where a ``scripts/train.py --marglik`` run spends its time, by phase (cProfile).

    python benchmarks/profile_marglik.py [--write-md] [-- train.py flags ...]

Runs the recipe in this process under ``cProfile`` once per setting (the default, and
``--marglik_curvature fit`` with the Monte-Carlo GGN: the earlier default) and reports the
cumulative time of the functions that make up each phase:

- training: ``MargLikTrainer.train`` minus the marginal-likelihood work inside it;
- online curvature: the extra backward passes of sampled labels (``OnlineCurvature.add``);
- curvature pass: ``fit_curvature`` (a pass over the training data);
- eigendecompositions: ``Curvature.posterior`` (the factors' ``eigh``);
- hyper-steps: ``HyperOptimizer.step``;
- predictive prior: ``tune_predictive_prior`` (validation Jacobians + grid);
- test predictive: ``laplace_test_probs`` (test Jacobians, both priors);
- total: the whole ``run``.

cProfile adds overhead to Python-heavy code (about 10–30% here), so the shares, not the
seconds, are the figures to read. Phases nest (a curvature pass inside ``Trainer.train``):
the training row is ``Trainer.train`` minus the phases that run inside it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from benchlib import add_markdown_args, git_rev, load_average, offline_environment, replace_section

SECTION = "## Profile of a --marglik run"
PHASES = {
    "online curvature": ("hf_marglik/online.py", "add"),
    "curvature pass": ("hf_marglik/curvature.py", "fit_curvature"),
    "eigendecompositions": ("hf_marglik/curvature.py", "posterior"),
    "hyper-steps": ("hf_marglik/hyper.py", "step"),
    "predictive prior": ("hf_marglik/tuning.py", "tune_predictive_prior"),
    "test predictive": ("hf_marglik/recipe/run.py", "laplace_test_probs"),
}
INSIDE_TRAIN = (
    "online curvature",
    "curvature pass",
    "eigendecompositions",
    "hyper-steps",
    "predictive prior",
)


def cumulative(stats: pstats.Stats, file_end: str, name: str) -> float:
    total = 0.0
    for (path, _, func), (_, _, _, ct, _) in stats.stats.items():
        if func == name and path.endswith(file_end):
            total += ct
    return total


def profile(flags: list[str]) -> dict:
    from hf_marglik.recipe import parse_args, run

    cfg = parse_args(["--marglik", "--disable_tqdm", "true", *flags])
    prof = cProfile.Profile()
    start = time.time()
    prof.enable()
    run(cfg)
    prof.disable()
    wall = time.time() - start
    stats = pstats.Stats(prof)
    out = {name: cumulative(stats, *where) for name, where in PHASES.items()}
    train = cumulative(stats, "hf_marglik/trainer.py", "train")  # MargLikTrainerMixin.train
    out["training"] = train - sum(out[k] for k in INSIDE_TRAIN)
    out["total"] = cumulative(stats, "hf_marglik/recipe/run.py", "run")
    out["wall"] = wall
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_markdown_args(p, SECTION)
    p.add_argument("flags", nargs="*", help="extra train.py flags (after --)")
    args = p.parse_args()
    offline_environment()
    load_before = load_average()
    settings = {
        "default (online Monte-Carlo K-FAC, budget 0.25)": [],
        "a Monte-Carlo pass every epoch (the earlier default)": ["--marglik_curvature", "fit"],
    }
    rows = {}
    for label, extra in settings.items():
        print(f"profiling: {label}", flush=True)
        rows[label] = profile([*args.flags, *extra, "--output_dir", f"/tmp/profile-{len(rows)}"])
    phases = ["training", *PHASES, "total"]
    lines = [
        "| phase | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for ph in phases:
        cells = []
        for r in rows.values():
            cells.append(f"{r[ph]:.1f} s ({r[ph] / r['total']:.0%})")
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    body = "\n".join(
        [
            SECTION,
            "",
            f"Command: `python benchmarks/profile_marglik.py --write-md {' '.join(args.flags)}`"
            f" (2-core CPU; git {git_rev()}; {time.strftime('%Y-%m-%d')}; load average before "
            f"{load_before}, after {load_average()}). Cumulative cProfile time per phase of "
            "the default `scripts/train.py --marglik` run (percent of the whole run):",
            "",
            *lines,
        ]
    )
    print(body)
    if args.write_md:
        replace_section(args.md, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
