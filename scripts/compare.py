"""Run a whole comparison study (issue 13) from one command: plain fine-tuning (weight decay 0.01
and grid-searched), --marglik (MAP and Laplace predictive), post-hoc Laplace and temperature
scaling, on the same data, model, optimiser, epochs and seeds, per task and regime.

    python scripts/compare.py [--out outputs/study] [--tasks default llm] [--regimes default long]
                              [--arms ...] [--seeds 0 1 2] [--wd_grid 0 1e-3 1e-2 1e-1 1]
                              [--dry_run] [--report_only]

Resumable: every finished run is recorded and skipped; a killed study continues where it
stopped (a half-written run is redone). Writes ``<out>/study.json``, ``<out>/table.md`` and
``<out>/figures/*.png``. See ``hf_marglik/recipe/study.py`` for the arms, regimes and tasks.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class BadArguments(Exception):
    """A flag argparse cannot read (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise BadArguments(f"{message}. See --help.")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` lists every task, regime and arm."""
    from hf_marglik.recipe.study import (
        ARMS,
        DEFAULT_ARMS,
        DEFAULT_TASKS,
        DEFAULT_WD_GRID,
        REGIMES,
        TASKS,
    )

    lines = ["tasks (each regime's train.py flags after the config):"]
    for t in TASKS.values():
        lines.append(f"  {t.name}: {t.description}; --config {t.config} {' '.join(t.overrides)}")
        for r, flags in t.regimes.items():
            lines.append(f"      regime {r}: {' '.join(flags) or '(no further flags)'}")
    lines.append("regimes:")
    lines += [f"  {r.name}: {r.description} (target: vs {r.target})" for r in REGIMES.values()]
    lines.append("arms:")
    lines += [f"  {a.name}: {a.description}" for a in ARMS.values()]
    parser = _Parser(
        prog="compare.py",
        description="Run the comparison study of plain fine-tuning, marginal-likelihood training "
        "and post-hoc calibration; resumable (finished runs are skipped).",
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # "--arm" must not silently mean "--arms"
    )
    parser.add_argument(
        "--out", default="outputs/study", help="Study folder (default %(default)s)."
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_TASKS),
        help="Tasks to run (default: %(default)s).",
    )
    parser.add_argument(
        "--regimes", nargs="+", default=list(REGIMES), help="Regimes to run (default: all)."
    )
    parser.add_argument(
        "--arms", nargs="+", default=list(DEFAULT_ARMS), help="Arms (default: all)."
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="Training seeds (default: %(default)s).",
    )
    parser.add_argument(
        "--wd_grid",
        nargs="+",
        type=float,
        default=list(DEFAULT_WD_GRID),
        help="Weight decays of the grid arm (default %(default)s).",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="Print the plan and what is done; run nothing."
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Write study.json, table.md and the figures from the finished runs; run nothing.",
    )
    return parser


def main(args: list[str] | None = None) -> int:
    """Run the study; return the exit status: 0 done, 1 a run failed (what finished is kept;
    rerun to retry), 2 bad input (one line, nothing written), 130 interrupted."""
    from hf_marglik.recipe.study import RunFailed, StudyError, describe_plan, make_study, run_study

    try:
        ns = make_parser().parse_args(args)
        study = make_study(ns.out, ns.tasks, ns.regimes, ns.arms, ns.seeds, ns.wd_grid)
        if ns.dry_run:
            from hf_marglik.recipe.study import check_fingerprint

            check_fingerprint(study)
            for step, state in describe_plan(study):
                print(f"{state:8s} {step.label()}  ({step.folder(study.out)})")
            return 0
        results = run_study(study, report_only=ns.report_only)
    except (StudyError, BadArguments) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "compare.py: interrupted; finished runs are kept. Rerun the same command to continue.",
            file=sys.stderr,
        )
        return 130
    for cell in results["cells"]:
        t = cell["target"]
        print(f"{cell['task']} / {cell['regime']}: target {t['status']}: {t.get('reason', '')}")
    print(f"Results: {study.out / 'study.json'}, {study.out / 'table.md'}, {study.out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
