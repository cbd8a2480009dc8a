"""The comparison study behind ``scripts/compare.py`` (issue 13): registries of tasks, regimes and
arms, the plan of training runs and post-hoc jobs, their resumable execution and the
aggregation over seeds. The records on disk are :mod:`.study_store`'s, the post-hoc
computations :mod:`.study_posthoc`'s, the Markdown table and the figures
:mod:`.study_report`'s.

**Tasks** (:data:`TASKS`) are a config of ``scripts/train.py`` with size overrides, and say what
each regime means for them (the flags of every cell are printed by ``compare.py --help``):

- ``default``: ``configs/default.yaml`` (MiniLM + LoRA, BBC News 320/80/200, 128 tokens, 5
  epochs). Regime ``long``: 160 training articles, 15 epochs.
- ``llm``: ``configs/smollm2_answer_token.yaml`` (SmolLM2-135M-Instruct, answer-token
  classification) at 320/80/100 articles × 64 tokens, no per-epoch validation pass
  (``--eval_strategy no``: no arm reads it; the final validation predictions are saved).
  Regime ``default``: the config's 2 epochs (its own budget: the answer-token model reaches
  test accuracy 0.94 after one epoch on 32 articles; 5 epochs would cost 2.5 times as much);
  ``long``: 64 training articles, 15 epochs (160 would triple that cell).
  Chosen from two timing runs on this 2-core machine (real weights, 32 training / 16
  validation / 16 test articles × 64 tokens, 1 epoch, load average 3.4–4.2, 2026-12-01):
  plain 88 s training, 113 s in all, 92 CPU-s (the GGUF load ≈ 20 s of it); ``--marglik`` 80 s
  training (one Monte-Carlo K-FAC fit), 192 s in all, 150 CPU-s, of which the GLM probit
  predictive on the 16 test articles ≈ 75 s (≈ 4–5 CPU-s per article: one backward per
  class). So ≈ 1.3 CPU-s per training article and epoch at 64 tokens, ≈ 0.45 per forward.
  Extrapolated, not measured at full size: a plain default-regime run ≈ 16 CPU-min, a
  ``--marglik`` run ≈ 40 CPU-min (two fits and the test predictive), the post-hoc Laplace ≈
  15 CPU-min: the 3-seed default cell ≈ 7 CPU-hours (≈ 4–5 h on the idle machine, of which
  the 15 grid runs are 4 h); the long cell without the grid ≈ 4.5 CPU-hours, the grid adds
  ≈ 4. 128 tokens would double all of it.
- ``llm_small``: the ``llm`` task at 96/40/60 articles (``long``: 32 articles, 15 epochs):
  the size whose 3-seed cell of plain, ``--marglik`` and the post-hoc arms (no grid) fits in
  about an hour of this machine's two cores, where ``llm``'s needs about 7 CPU-hours.
- ``default_full_test``: the ``default`` task with all of BBC News' 2,225 articles used: the
  test split is every article the training and validation splits leave (1,825; ``long``:
  1,985), and its first 200 are the ``default`` task's test split (the splits are cut in order
  from one shuffle). The ECE of 200 articles has a noise floor near the size of the effects
  measured (``benchmarks/ece_floor.py``); this task's is three times smaller. Training and
  validation are the ``default`` task's, run for run.
- ``tiny``: the default config at 16/8/8 articles × 16 tokens, 1 epoch (``long``: 2), one
  marginal-likelihood update after the epoch. For tests and smoke checks only; its numbers
  mean nothing.

**Regimes** (:data:`REGIMES`): ``default`` (the task's default budget) and ``long`` (few
articles, many epochs: plain fine-tuning overfits and becomes overconfident). Each carries its
target (below).

**Arms** (:data:`ARMS`; :data:`DEFAULT_ARMS` are the issue's six, arm 5 in two variants). An
arm names the ``train.py`` runs it needs (:class:`RunSpec`: a key and flags; the same key is
one run, shared by every arm that names it), the post-hoc jobs (:class:`JobSpec`) and how its
test metrics and compute are read from them:

- ``plain``: weight decay 0.01 (``--weight_decay 0.01``), metrics.json ``test``.
- ``grid``: one plain run per weight decay of the grid (``--wd_grid``, default 0, 1e-3, 1e-2,
  1e-1, 1; the 0.01 run is ``plain``'s, not trained twice); per seed the weight decay of the
  lowest validation NLL (MAP, the run's ``validation`` metrics; ties: the first in grid order)
  gives the test metrics; its compute is the sum over the grid's runs.
- ``marglik_map`` / ``marglik_laplace``: one ``--marglik`` run; metrics.json ``test`` / ``test_laplace``
  (the GLM probit predictive).
- ``posthoc_laplace`` / ``posthoc_laplace_gridsearch``: the plain run's MAP, Laplace fitted and
  the prior tuned after training (:func:`.study_posthoc.posthoc_laplace`).
- ``temperature``: temperature scaling of the plain MAP on the validation split.

A new arm is a registry entry; :func:`marglik_arms` makes the MAP and Laplace arms of a
``--marglik`` run with extra flags, e.g. ``ARMS.update(marglik_arms("marglik_exact",
("--backend", "ggn"), "exact GGN"))``.

**Resumability** (:mod:`.study_store`). Every training run is ``scripts/train.py`` (with
``--save_predictions true``) in a subprocess writing its own folder
``<out>/<task>/<regime>/runs/<key>-seed<s>/`` (``train.log`` holds its output); the study
writes ``study_run.json`` there (atomically) only after train.py exited 0: that file marks a
finished run, which is never redone or touched. A folder without it was left by a killed study
(at most one): it is deleted and the run redone from the start (not resumed from a
checkpoint: the default configs save none). The child gets SIGKILL when the study dies (Linux
``PR_SET_PDEATHSIG``), so no orphan keeps writing. A post-hoc job is computed in the study's
own process (no second model load per job; its output goes to ``job.log``) into a temporary
folder renamed to ``<out>/<task>/<regime>/posthoc/<key>-seed<s>/`` when complete. ``<out>/study_config.json`` is
the fingerprint: per cell the config's values and the flags, per arm its runs and jobs, and the
study-wide settings (weight-decay grid, post-hoc settings, format). A folder made with another
fingerprint is refused with the differences listed (use a new ``--out``); seeds, arms, tasks
and regimes may be added to an existing study. One study at a time per folder (a lock file).

**Compute.** Per run: the wall and CPU time (user + sys of the child, ``RUSAGE_CHILDREN``) of
the whole subprocess, and from metrics.json the training's wall time and CPU time
(``time.process_time`` around ``trainer.train``, all threads). Per post-hoc job: wall and CPU
time (``time.process_time`` of this process) of the extra work. The compute target compares
the training CPU time (the fairer measure on a shared machine) of the ``--marglik`` runs with
that of the grid's runs, summed over seeds; the table also prints whole-run CPU and wall.

**Aggregates and targets** (:func:`aggregate`): per arm the mean ± sample standard deviation
(``ddof=1``) over the seeds it has; paired differences per seed against ``plain`` (and
``marglik_map − grid``) over common seeds. Targets, evaluated from the numbers:
``default`` regime: the mean ``marglik_map`` test NLL ≤ the grid's, at ≤ 1/3 of the grid's
training CPU time; ``long`` regime: for NLL and ECE the mean paired difference
``marglik_map − plain`` < 0 by more than its standard deviation over seeds (needs ≥ 2 seeds).
Every task gets its regime's target. A verdict on fewer than 3 seeds says so.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import study_store as store
from .study_posthoc import (
    MARGLIK_PREDICTIVE_SETTINGS,
    POSTHOC_LAPLACE_SETTINGS,
    TEMPERATURE_SETTINGS,
)
from .study_store import JobRecord, RunFailed, RunRecord, StudyError

__all__ = ["RunFailed", "StudyError", "make_study", "run_study", "describe_plan"]

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
STUDY_FORMAT = 1
CONFIG_NAME = "study_config.json"
RESULTS_NAME = "study.json"
TABLE_NAME = "table.md"
FIGURES_DIR = "figures"
METRICS = ("accuracy", "nll", "ece", "brier")
COMMON_ARGS = ("--save_predictions", "true", "--disable_tqdm", "true", "--report_to", "none")
"""Flags of every run: the predictions for the post-hoc arms and the figures, quiet logs."""
DEFAULT_WD_GRID = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
PLAIN_WD = 0.01
MIN_SEEDS = 3


# ---------------------------------------------------------------- registries
@dataclass(frozen=True)
class Regime:
    name: str
    description: str
    target: str  # "grid" or "plain" (see the module docstring)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    config: str  # relative to the repository root
    overrides: tuple[str, ...]
    regimes: dict[str, tuple[str, ...]]  # regime name -> its train.py flags for this task

    def args(self, regime: str) -> tuple[str, ...]:
        return (*self.overrides, *self.regimes[regime])


REGIMES = {
    "default": Regime("default", "the task's default training budget", "grid"),
    "long": Regime(
        "long",
        "few articles, many epochs: plain fine-tuning overfits, becomes overconfident",
        "plain",
    ),
}

_LONG = ("--max_train_samples", "160", "--num_train_epochs", "15")
TASKS = {
    "default": Task(
        "default",
        "all-MiniLM-L6-v2 + LoRA, BBC News 320/80/200 articles x 128 tokens, 5 epochs",
        "configs/default.yaml",
        (),
        {"default": (), "long": _LONG},
    ),
    "llm": Task(
        "llm",
        "SmolLM2-135M-Instruct + LoRA, answer-token classification, BBC News 320/80/100 "
        "articles x 64 tokens, 2 epochs",
        "configs/smollm2_answer_token.yaml",
        tuple(
            "--max_train_samples 320 --max_eval_samples 80 --max_test_samples 100 "
            "--max_seq_length 64 --eval_strategy no".split()
        ),
        {"default": (), "long": ("--max_train_samples", "64", "--num_train_epochs", "15")},
    ),
    "llm_small": Task(
        "llm_small",
        "SmolLM2-135M-Instruct + LoRA, answer-token classification, BBC News 96/40/60 "
        "articles x 64 tokens, 2 epochs",
        "configs/smollm2_answer_token.yaml",
        tuple(
            "--max_train_samples 96 --max_eval_samples 40 --max_test_samples 60 "
            "--max_seq_length 64 --eval_strategy no".split()
        ),
        {"default": (), "long": ("--max_train_samples", "32", "--num_train_epochs", "15")},
    ),
    "default_full_test": Task(
        "default_full_test",
        "the default task with every article left over as the test split (BBC News 320/80/1825; "
        "long: 160/80/1985), its first 200 being the default task's test split",
        "configs/default.yaml",
        (),
        {
            "default": ("--max_test_samples", "1825"),
            "long": (*_LONG, "--max_test_samples", "1985"),
        },
    ),
    "tiny": Task(
        "tiny",
        "tests only: MiniLM at 16/8/8 articles x 16 tokens, 1 epoch (meaningless numbers)",
        "configs/default.yaml",
        tuple(
            "--max_train_samples 16 --max_eval_samples 8 --max_test_samples 8 "
            "--max_seq_length 16 --num_train_epochs 1 --eval_strategy no --logging_steps 1 "
            "--lora_target_modules query --n_epochs_burnin 0 --n_hypersteps 5".split()
        ),
        {"default": (), "long": ("--num_train_epochs", "2")},
    ),
}
DEFAULT_TASKS = ("default", "llm")


@dataclass(frozen=True)
class RunSpec:
    """One ``scripts/train.py`` run per seed: ``key`` names its folder, ``args`` its flags."""

    key: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class JobSpec:
    """One post-hoc computation per seed on the finished run ``base``; ``kind`` is a key of
    :data:`JOBS`."""

    key: str
    kind: str
    base: RunSpec


def plain_run(wd: float) -> RunSpec:
    return RunSpec(f"plain-wd{wd:g}", ("--weight_decay", f"{wd:g}"))


PLAIN = plain_run(PLAIN_WD)
MARGLIK = RunSpec("marglik", ("--marglik",))


@dataclass(frozen=True)
class Settings:
    """Study-wide settings that change results (part of the fingerprint)."""

    wd_grid: tuple[float, ...] = DEFAULT_WD_GRID

    def fingerprint(self) -> dict:
        return {
            "format": STUDY_FORMAT,
            "common_args": list(COMMON_ARGS),
            "wd_grid": list(self.wd_grid),
            "plain_wd": PLAIN_WD,
            "posthoc_laplace": POSTHOC_LAPLACE_SETTINGS,
            "marglik_predictive": MARGLIK_PREDICTIVE_SETTINGS,
            "temperature": TEMPERATURE_SETTINGS,
        }


class Arm:
    """An arm: the runs and jobs it needs per seed and how its result is read from them.

    ``result(view)`` returns ``{"metrics", "train_cpu_s", "train_wall_s", "cpu_s", "wall_s",
    "details"}`` for one seed, or None while something it needs is missing; ``test_probs(view)``
    returns ``(probs, labels)`` of the test split for the reliability diagrams (or None)."""

    name: str
    description: str

    def runs(self, settings: Settings) -> tuple[RunSpec, ...]:
        return ()

    def jobs(self, settings: Settings) -> tuple[JobSpec, ...]:
        return ()

    def fingerprint(self, settings: Settings) -> dict:
        return {
            "class": type(self).__name__,
            "runs": {r.key: list(r.args) for r in self.runs(settings)},
            "jobs": {j.key: [j.kind, j.base.key] for j in self.jobs(settings)},
            **self._reads(),
        }

    def _reads(self) -> dict:
        return {}

    def result(self, view: SeedView) -> dict | None:
        raise NotImplementedError

    def test_probs(self, view: SeedView):
        return None


def _run_compute(records: Iterable[RunRecord]) -> dict:
    records = list(records)
    return {
        "train_cpu_s": sum(r.metrics.get("train_cpu_s") or math.nan for r in records),
        "train_wall_s": sum(r.metrics["train_runtime_s"] for r in records),
        "cpu_s": sum(r.record["timing"]["cpu_s"] for r in records),
        "wall_s": sum(r.record["timing"]["wall_s"] for r in records),
    }


@dataclass(frozen=True)
class RunArm(Arm):
    """The metrics under ``read`` (``test`` or ``test_laplace``) of one run's metrics.json."""

    name: str
    description: str
    run: RunSpec
    read: str = "test"

    def runs(self, settings):
        return (self.run,)

    def _reads(self):
        return {"read": self.read}

    def result(self, view):
        r = view.run(self.run)
        if r is None:
            return None
        if r.metrics.get(self.read) is None:
            raise RunFailed(f"{r.folder}: metrics.json has no {self.read!r} (arm {self.name}).")
        return {"metrics": _pick(r.metrics[self.read]), **_run_compute([r]), "details": {}}

    def test_probs(self, view):
        r = view.run(self.run)
        return None if r is None else r.test_probs(self.read)


@dataclass(frozen=True)
class GridArm(Arm):
    """Plain runs over the weight-decay grid, chosen per seed by the validation NLL."""

    name: str
    description: str

    def runs(self, settings):
        return tuple(plain_run(wd) for wd in settings.wd_grid)

    def result(self, view):
        runs = [view.run(spec) for spec in self.runs(view.settings)]
        if any(r is None for r in runs):
            return None
        nll = [r.metrics["validation"]["nll"] for r in runs]
        best = min(range(len(runs)), key=lambda i: nll[i])
        details = {
            "chosen_weight_decay": view.settings.wd_grid[best],
            "validation_nll": dict(zip((f"{w:g}" for w in view.settings.wd_grid), nll)),
        }
        return {
            "metrics": _pick(runs[best].metrics["test"]),
            **_run_compute(runs),
            "details": details,
        }

    def test_probs(self, view):
        result = self.result(view)
        if result is None:
            return None
        return view.run(plain_run(result["details"]["chosen_weight_decay"])).test_probs("test")


@dataclass(frozen=True)
class JobArm(Arm):
    """A variant of a post-hoc job on a finished run; compute = the run's + the job's extra."""

    name: str
    description: str
    job: JobSpec
    variant: str

    def runs(self, settings):
        return (self.job.base,)

    def jobs(self, settings):
        return (self.job,)

    def _reads(self):
        return {"variant": self.variant}

    def result(self, view):
        base, job = view.run(self.job.base), view.job(self.job)
        if base is None or job is None:
            return None
        v = job.result["variants"].get(self.variant)
        if v is None:  # not applicable to this model (a last-layer variant without a head)
            return None
        extra = v.get("extra", job.result["timing"])
        compute = _run_compute([base])
        compute["cpu_s"] += extra["cpu_s"]
        compute["wall_s"] += extra["wall_s"]
        details = {k: x for k, x in v.items() if k != "test"}
        details.update({k: x for k, x in job.result.items() if k not in ("variants", "spec")})
        details["extra"] = extra
        return {"metrics": _pick(v["test"]), **compute, "details": details}

    def test_probs(self, view):
        job = view.job(self.job)
        if job is None:
            return None
        t = job.tensors()
        return (t[self.variant], t["labels"]) if self.variant in t else None


def marglik_arms(name: str, flags: tuple[str, ...], description: str) -> dict[str, Arm]:
    """The MAP (``<name>_map``) and Laplace-predictive (``<name>_laplace``) arms of one
    ``--marglik`` run with extra ``flags`` (its folder key is ``name``)."""
    spec = RunSpec(name, ("--marglik", *flags))
    return {
        f"{name}_map": RunArm(f"{name}_map", f"{description}, MAP", spec, "test"),
        f"{name}_laplace": RunArm(
            f"{name}_laplace", f"{description}, Laplace GLM probit predictive", spec, "test_laplace"
        ),
        f"{name}_laplace_learned": RunArm(
            f"{name}_laplace_learned",
            f"{description}, Laplace GLM probit predictive at the learned precisions",
            spec,
            "test_laplace_learned_prior",
        ),
    }


POSTHOC_LAPLACE = JobSpec("posthoc_laplace", "posthoc_laplace", PLAIN)
MARGLIK_PREDICTIVE = JobSpec("marglik_predictive", "marglik_predictive", MARGLIK)
TEMPERATURE = JobSpec("temperature", "temperature", PLAIN)
ARMS: dict[str, Arm] = {
    "plain": RunArm("plain", f"plain fine-tuning, weight decay {PLAIN_WD:g}", PLAIN),
    "grid": GridArm("grid", "plain fine-tuning, weight decay chosen by validation NLL"),
    **marglik_arms("marglik", (), "--marglik (learned prior)"),
    **marglik_arms(
        "marglik_init",
        ("--prior_mean", "init"),
        "--marglik, the prior centred at the initialisation",
    ),
    **marglik_arms(
        "marglik_decoupled",
        ("--prior_application", "decoupled", "--restore_best_marglik", "false"),
        "--marglik, the learned prior applied as decoupled decay, the last model kept",
    ),
    **marglik_arms(
        "marglik_decoupled_tied",
        ("--prior_application", "decoupled", "--restore_best_marglik", "false")
        + ("--tie_lora_prior", "true"),
        "--marglik, decoupled decay, one precision per LoRA adapter, the last model kept",
    ),
    **marglik_arms(
        "marglik_trust",
        ("--max_log_prior_step", "1.0"),
        "--marglik, log prior precision moved at most 1 per update",
    ),
    **marglik_arms(
        "marglik_b_only",
        ("--freeze_lora_a", "true"),
        "--marglik, LoRA B only (A frozen at its initialisation)",
    ),
    **marglik_arms(
        "marglik_exact",
        ("--backend", "ggn", "--marglik_curvature", "fit"),
        "--marglik, exact GGN from a pass at every update",
    ),
    "posthoc_laplace": JobArm(
        "posthoc_laplace",
        "plain MAP + K-FAC Laplace, prior tuned after training by the marginal likelihood "
        "(Laplace-LoRA)",
        POSTHOC_LAPLACE,
        "marglik",
    ),
    "posthoc_laplace_gridsearch": JobArm(
        "posthoc_laplace_gridsearch",
        "plain MAP + K-FAC Laplace, scalar prior by validation NLL of the predictive (grid)",
        POSTHOC_LAPLACE,
        "gridsearch",
    ),
    "posthoc_laplace_last_layer": JobArm(
        "posthoc_laplace_last_layer",
        "plain MAP + last-layer K-FAC Laplace, prior tuned by the marginal likelihood "
        "(laplace-torch's default post-hoc Laplace; without a head: the last adapted layer's LoRA)",
        POSTHOC_LAPLACE,
        "last_layer_marglik",
    ),
    "posthoc_laplace_last_layer_gridsearch": JobArm(
        "posthoc_laplace_last_layer_gridsearch",
        "plain MAP + last-layer K-FAC Laplace, scalar prior by validation NLL",
        POSTHOC_LAPLACE,
        "last_layer_gridsearch",
    ),
    "marglik_laplace_all": JobArm(
        "marglik_laplace_all",
        "--marglik, its saved posterior's predictive over all tensors, prior by validation",
        MARGLIK_PREDICTIVE,
        "all",
    ),
    "marglik_laplace_last_layer": JobArm(
        "marglik_laplace_last_layer",
        "--marglik, its saved posterior's predictive over the last layer only (the head, or the "
        "last adapted layer's LoRA), prior by validation",
        MARGLIK_PREDICTIVE,
        "last_layer",
    ),
    "temperature": JobArm(
        "temperature",
        "plain MAP, temperature scaled on the validation split",
        TEMPERATURE,
        "temperature",
    ),
}
DEFAULT_ARMS = tuple(ARMS)
LABELS = {
    "plain": f"plain wd {PLAIN_WD:g}",
    "grid": "plain, wd by grid",
    "marglik_map": "marglik MAP",
    "marglik_laplace": "marglik Laplace",
    "marglik_laplace_learned": "marglik Laplace, learned prior",
    "marglik_init_map": "marglik MAP, prior at θ₀",
    "marglik_init_laplace": "marglik Laplace, prior at θ₀",
    "marglik_init_laplace_learned": "marglik Laplace, prior at θ₀, learned prior",
    "marglik_exact_map": "marglik exact-fit MAP",
    "marglik_exact_laplace": "marglik exact-fit Laplace",
    "marglik_exact_laplace_learned": "marglik exact-fit Laplace, learned prior",
    "posthoc_laplace": "post-hoc Laplace (marglik)",
    "posthoc_laplace_gridsearch": "post-hoc Laplace (grid)",
    "posthoc_laplace_last_layer": "post-hoc last-layer Laplace (marglik)",
    "posthoc_laplace_last_layer_gridsearch": "post-hoc last-layer Laplace (grid)",
    "marglik_laplace_all": "marglik Laplace, all tensors",
    "marglik_laplace_last_layer": "marglik Laplace, last layer",
    "temperature": "temperature scaling",
}


def _pick(metrics: dict) -> dict:
    return {k: float(metrics[k]) for k in METRICS}


# ---------------------------------------------------------------- selection and fingerprint
def _choose(kind: str, names: Iterable[str], valid: Iterable[str]) -> tuple[str, ...]:
    from .errors import nearest

    valid, out = list(valid), []
    for name in names:
        if name not in valid:
            raise StudyError(
                f"unknown {kind} {name!r}.{nearest(name, valid)} Valid {kind}s: {', '.join(valid)}."
            )
        if name not in out:
            out.append(name)
    if not out:
        raise StudyError(f"no {kind} given; valid {kind}s: {', '.join(valid)}.")
    return tuple(out)


@dataclass(frozen=True)
class Cell:
    task: Task
    regime: Regime

    @property
    def key(self) -> str:
        return f"{self.task.name}/{self.regime.name}"

    def args(self) -> tuple[str, ...]:
        return self.task.args(self.regime.name)

    def fingerprint(self) -> dict:
        import yaml

        path = ROOT / self.task.config
        if not path.is_file():
            raise StudyError(f"task {self.task.name!r}: config {self.task.config} does not exist.")
        return {
            "config": self.task.config,
            "config_values": yaml.safe_load(path.read_text()) or {},
            "args": list(self.args()),
        }


@dataclass
class Study:
    """What one invocation runs: the cells, arms, seeds and settings, and the folder."""

    out: Path
    cells: list[Cell]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: Settings = field(default_factory=Settings)

    def fingerprint(self) -> dict:
        return {
            "settings": self.settings.fingerprint(),
            "cells": {c.key: c.fingerprint() for c in self.cells},
            "arms": {a: ARMS[a].fingerprint(self.settings) for a in self.arms},
        }


def make_study(
    out: str | os.PathLike,
    tasks: Iterable[str] = DEFAULT_TASKS,
    regimes: Iterable[str] = tuple(REGIMES),
    arms: Iterable[str] = DEFAULT_ARMS,
    seeds: Iterable[int] = (0, 1, 2),
    wd_grid: Iterable[float] = DEFAULT_WD_GRID,
) -> Study:
    """Check the names and values (a :class:`StudyError` naming the valid ones) and build the
    study; nothing is read from or written to ``out`` yet."""
    tasks = _choose("task", tasks, TASKS)
    regimes = _choose("regime", regimes, REGIMES)
    arms = _choose("arm", arms, ARMS)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds or min(seeds) < 0:
        raise StudyError(f"seeds must be non-negative integers; got {list(seeds)}.")
    grid = tuple(dict.fromkeys(float(w) for w in wd_grid))
    if not grid or min(grid) < 0 or not all(math.isfinite(w) for w in grid):
        raise StudyError(f"wd_grid must be non-negative numbers; got {list(grid)}.")
    cells = []
    for t in tasks:
        for r in regimes:
            if r not in TASKS[t].regimes:
                raise StudyError(
                    f"task {t!r} has no regime {r!r}; its regimes: {', '.join(TASKS[t].regimes)}."
                )
            cells.append(Cell(TASKS[t], REGIMES[r]))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {str(out)!r} is a file, not a folder.")
    return Study(out, cells, arms, seeds, Settings(grid))


def _differences(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                diffs.append(f"{p}: not recorded, now {json.dumps(new[k])}")
            elif k not in new:
                diffs.append(f"{p}: recorded {json.dumps(old[k])}, now absent")
            else:
                diffs.extend(_differences(old[k], new[k], p))
        return diffs
    if old != new:
        return [f"{path}: recorded {json.dumps(old)}, now {json.dumps(new)}"]
    return []


def _json_roundtrip(value):
    return json.loads(json.dumps(value))


def check_fingerprint(study: Study) -> dict | None:
    """The merged fingerprint to write (None: nothing new), or a :class:`StudyError` when the
    folder holds something else or a study with other settings, cells or arms of the same
    name. Reads only."""
    out = study.out
    new = _json_roundtrip(study.fingerprint())
    path = out / CONFIG_NAME
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise StudyError(
                f"{str(out)!r} is not empty and holds no {CONFIG_NAME}: it is not a study "
                "folder. Choose a new or empty --out folder."
            )
        return new
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StudyError(f"{path} cannot be read ({e}); choose a new --out folder.") from None
    diffs = _differences(old.get("settings"), new["settings"], "settings")
    for section in ("cells", "arms"):
        recorded = old.get(section, {})
        for key, value in new[section].items():
            if key in recorded:
                diffs += _differences(recorded[key], value, f"{section}[{key}]")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise StudyError(
            f"{str(out)!r} holds a study made with another configuration ({shown}). Its runs "
            "would not compare: use a new --out folder (or restore the settings it was made "
            "with)."
        )
    merged = {
        "settings": old["settings"],
        "cells": {**old.get("cells", {}), **new["cells"]},
        "arms": {**old.get("arms", {}), **new["arms"]},
    }
    return None if merged == old else merged


# ---------------------------------------------------------------- plan
@dataclass(frozen=True)
class Step:
    """One unit of work: a training run or a post-hoc job, for one cell and seed."""

    cell: Cell
    seed: int
    run: RunSpec | None = None
    job: JobSpec | None = None

    @property
    def key(self) -> str:
        return (self.run or self.job).key

    def folder(self, out: Path) -> Path:
        kind = "runs" if self.run else "posthoc"
        return (
            out / self.cell.task.name / self.cell.regime.name / kind / f"{self.key}-seed{self.seed}"
        )

    def label(self) -> str:
        return f"{self.cell.key} {'run' if self.run else 'post-hoc'} {self.key} seed {self.seed}"

    def spec(self) -> dict:
        """What makes this step this step; recorded with it and checked on reuse."""
        if self.run:
            args = [*self.cell.args(), *self.run.args, "--seed", str(self.seed)]
            return {"run": self.run.key, "config": self.cell.task.config, "args": args}
        return {"job": self.job.key, "kind": self.job.kind, "base": self.job.base.key}

    def train_args(self) -> list[str]:
        return ["--config", str(ROOT / self.cell.task.config), *self.spec()["args"], *COMMON_ARGS]


def plan(study: Study) -> list[Step]:
    """Every run and job, once: cell by cell, seed by seed, runs before the jobs on them."""
    steps: list[Step] = []
    for cell in study.cells:
        for seed in study.seeds:
            runs, jobs = {}, {}
            for name in study.arms:
                for r in ARMS[name].runs(study.settings):
                    runs.setdefault(r.key, r)
                for j in ARMS[name].jobs(study.settings):
                    jobs.setdefault(j.key, j)
            steps += [Step(cell, seed, run=r) for r in runs.values()]
            steps += [Step(cell, seed, job=j) for j in jobs.values()]
    return steps


# ---------------------------------------------------------------- records
def step_state(step: Step, out: Path) -> str:
    """``done`` (recorded, same spec), ``partial`` (a folder without its record: an
    interrupted run), ``todo``; a :class:`StudyError` when the record has another spec."""
    return store.folder_state(step.folder(out), step.spec(), step.run is not None)


def load_record(step: Step, out: Path) -> RunRecord | JobRecord | None:
    if step_state(step, out) != "done":
        return None
    return store.load(step.folder(out), step.run is not None)


@dataclass
class SeedView:
    """The finished runs and jobs of one cell and seed."""

    out: Path
    cell: Cell
    seed: int
    settings: Settings

    def run(self, spec: RunSpec) -> RunRecord | None:
        return load_record(Step(self.cell, self.seed, run=spec), self.out)

    def job(self, spec: JobSpec) -> JobRecord | None:
        return load_record(Step(self.cell, self.seed, job=spec), self.out)


# ---------------------------------------------------------------- execution
def _temperature(view: SeedView, base: RunRecord):
    from .study_posthoc import temperature_scaling

    return temperature_scaling(base.folder)


def _posthoc_laplace(view: SeedView, base: RunRecord):
    from .study_posthoc import posthoc_laplace

    argv = base.record["argv"]
    return posthoc_laplace(base.folder, argv[2 : argv.index("--output_dir")])  # train.py's


def _marglik_predictive(view: SeedView, base: RunRecord):
    from .study_posthoc import marglik_predictive

    argv = base.record["argv"]
    return marglik_predictive(base.folder, argv[2 : argv.index("--output_dir")])


JOBS = {
    "temperature": _temperature,
    "posthoc_laplace": _posthoc_laplace,
    "marglik_predictive": _marglik_predictive,
}
"""Post-hoc job kinds: ``fn(view, base_run_record) -> (result, tensors)``."""


def execute(step: Step, study: Study) -> None:
    """Do one step: a training run in a subprocess, or a post-hoc job in this process."""
    folder = step.folder(study.out)
    if step.run:
        argv = [sys.executable, str(TRAIN_SCRIPT), *step.train_args(), "--output_dir", str(folder)]
        store.run_training(step.label(), folder, argv, step.spec(), cwd=ROOT)
        return
    view = SeedView(study.out, step.cell, step.seed, study.settings)
    base = view.run(step.job.base)
    if base is None:
        raise RunFailed(f"{step.label()}: its run {step.job.base.key} is not finished.")
    store.run_job(step.label(), folder, step.spec(), lambda: JOBS[step.job.kind](view, base))


def describe_plan(study: Study) -> list[tuple[Step, str]]:
    """Every step with its state (``done``, ``partial``, ``todo``); reads only."""
    return [(s, step_state(s, study.out)) for s in plan(study)]


def run_study(study: Study, report_only: bool = False, echo=print) -> dict:
    """Check the folder, run what is missing (unless ``report_only``), aggregate and write
    ``study.json``, ``table.md`` and the figures; return the aggregate. Bad input raises
    :class:`StudyError` before anything is written."""
    from .study_report import write_report

    merged = check_fingerprint(study)
    states = describe_plan(study)  # a record of another spec is refused here, before writing
    study.out.mkdir(parents=True, exist_ok=True)
    with store.locked(study.out):
        if merged is not None:
            store.write_json(study.out / CONFIG_NAME, merged)
        if not report_only:
            todo = [(s, st) for s, st in states if st != "done"]
            echo(
                f"{len(states) - len(todo)} of {len(states)} steps already done; {len(todo)} to do."
            )
            for i, (step, _) in enumerate(todo, 1):
                state = step_state(step, study.out)  # a step may have been redone meanwhile
                if state == "done":
                    continue
                folder = step.folder(study.out)
                if state == "partial":
                    echo(f"  {folder} is incomplete (an interrupted run): redoing it")
                    shutil.rmtree(folder)
                echo(f"[{i}/{len(todo)}] {step.label()} ...")
                start = time.perf_counter()
                execute(step, study)
                echo(
                    f"[{i}/{len(todo)}] {step.label()}: done in {time.perf_counter() - start:.0f} s"
                )
        results = aggregate(study)
        write_report(results, study)
    return results


# ---------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _summary(per_seed: dict[int, float]) -> dict:
    mean, std = _mean_std(list(per_seed.values()))
    return {"per_seed": per_seed, "mean": mean, "std": std, "n": len(per_seed)}


def _paired(a: dict, b: dict, metrics=METRICS) -> dict:
    seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]))
    return {
        m: _summary(
            {s: a["per_seed"][s]["metrics"][m] - b["per_seed"][s]["metrics"][m] for s in seeds}
        )
        for m in metrics
    }


def _few(n: int) -> str:
    return f" Only {n} seed(s): the issue asks for at least {MIN_SEEDS}." if n < MIN_SEEDS else ""


def _target_vs_grid(arms: dict, paired: dict) -> dict:
    statement = (
        "marglik MAP test NLL <= the grid-searched plain run's (mean over seeds), at <= 1/3 of "
        "the grid's training CPU time (summed over seeds)"
    )
    if "marglik_map" not in arms or "grid" not in arms:
        return {
            "statement": statement,
            "status": "not evaluated",
            "reason": "needs the arms marglik_map and grid",
        }
    d = paired.get("marglik_map - grid", {}).get("nll")
    if d is None or not d["n"]:
        return {
            "statement": statement,
            "status": "not evaluated",
            "reason": "no seed has both arms",
        }
    seeds = sorted(d["per_seed"])
    m, g = arms["marglik_map"]["per_seed"], arms["grid"]["per_seed"]
    nll_m = sum(m[s]["metrics"]["nll"] for s in seeds) / len(seeds)
    nll_g = sum(g[s]["metrics"]["nll"] for s in seeds) / len(seeds)
    ratios = {
        k: sum(m[s][k] for s in seeds) / sum(g[s][k] for s in seeds)
        for k in ("train_cpu_s", "cpu_s", "wall_s")
    }
    ok = nll_m <= nll_g and ratios["train_cpu_s"] <= 1 / 3
    reason = (
        f"NLL {nll_m:.4f} (marglik MAP) vs {nll_g:.4f} (grid) over seeds {seeds}: "
        f"{'<=' if nll_m <= nll_g else '>'}; training CPU ratio {ratios['train_cpu_s']:.3f} "
        f"({'<=' if ratios['train_cpu_s'] <= 1 / 3 else '>'} 1/3; whole runs: CPU "
        f"{ratios['cpu_s']:.3f}, wall {ratios['wall_s']:.3f}).{_few(len(seeds))}"
    )
    return {
        "statement": statement,
        "status": "met" if ok else "missed",
        "reason": reason,
        "nll": {"marglik_map": nll_m, "grid": nll_g},
        "compute_ratio": ratios,
        "seeds": seeds,
    }


def _target_vs_plain(arms: dict, paired: dict) -> dict:
    statement = (
        "marglik MAP test NLL and ECE below plain wd 0.01 by more than the seed spread (std) of "
        "the paired difference marglik MAP - plain"
    )
    if "marglik_map" not in arms or "plain" not in arms:
        return {
            "statement": statement,
            "status": "not evaluated",
            "reason": "needs the arms marglik_map and plain",
        }
    d = paired["marglik_map - plain"]
    n = d["nll"]["n"]
    if n < 2:
        return {
            "statement": statement,
            "status": "not evaluated",
            "reason": f"{n} seed(s) with both arms: a spread needs at least 2",
        }
    parts, ok = [], True
    for m in ("nll", "ece"):
        mean, std = d[m]["mean"], d[m]["std"]
        good = mean < 0 and -mean > std
        ok &= good
        parts.append(
            f"{m.upper()} difference {mean:+.4f} ± {std:.4f} ({'met' if good else 'missed'})"
        )
    return {
        "statement": statement,
        "status": "met" if ok else "missed",
        "reason": "; ".join(parts) + f" over {n} seeds.{_few(n)}",
    }


TARGETS = {"grid": _target_vs_grid, "plain": _target_vs_plain}


def aggregate_cell(study: Study, cell: Cell) -> dict:
    """Per arm the per-seed results and mean ± std, the paired differences and the target."""
    arms = {}
    for name in study.arms:
        per_seed = {}
        for seed in study.seeds:
            r = ARMS[name].result(SeedView(study.out, cell, seed, study.settings))
            if r is not None:
                per_seed[seed] = r
        summary = {m: _summary({s: r["metrics"][m] for s, r in per_seed.items()}) for m in METRICS}
        compute = {
            k: _summary({s: r[k] for s, r in per_seed.items()})
            for k in ("train_cpu_s", "train_wall_s", "cpu_s", "wall_s")
        }
        arms[name] = {
            "label": LABELS.get(name, name),
            "description": ARMS[name].description,
            "per_seed": per_seed,
            "metrics": summary,
            "compute": compute,
            "missing_seeds": [s for s in study.seeds if s not in per_seed],
        }
    paired = {}
    if "plain" in arms:
        for name in arms:
            if name != "plain":
                paired[f"{name} - plain"] = _paired(arms[name], arms["plain"])
    if "marglik_map" in arms and "grid" in arms:
        paired["marglik_map - grid"] = _paired(arms["marglik_map"], arms["grid"])
    if "marglik_map" in arms:  # a predictive against the MAP it comes from
        for name in arms:
            if name.startswith("marglik_laplace") or name == "marglik_init_map":
                paired[f"{name} - marglik_map"] = _paired(arms[name], arms["marglik_map"])
    target = TARGETS[cell.regime.target](arms, paired)
    return {
        "task": cell.task.name,
        "regime": cell.regime.name,
        "task_description": cell.task.description,
        "regime_description": cell.regime.description,
        "train_args": ["--config", cell.task.config, *cell.args()],
        "seeds": list(study.seeds),
        "arms": arms,
        "paired": paired,
        "target": target,
    }


def _run_entry(step: Step, rec: RunRecord) -> dict:
    m = rec.metrics
    marglik = m.get("marglik") or {}
    return {
        "task": step.cell.task.name,
        "regime": step.cell.regime.name,
        "run": step.key,
        "seed": step.seed,
        "folder": str(rec.folder),
        "argv": rec.record["argv"],
        "settings": {
            k: m.get(k)
            for k in (
                "mode",
                "model",
                "n_train",
                "n_validation",
                "n_test",
                "max_seq_length",
                "epochs",
                "weight_decay",
            )
        },
        "metrics": {
            k: m.get(k)
            for k in ("test", "test_laplace", "test_laplace_learned_prior", "validation")
        },
        "marglik": {
            k: v
            for k, v in marglik.items()
            if k
            in (
                "log_marglik_best",
                "prior_precision_mean",
                "prior_precision_min",
                "prior_precision_max",
                "update_steps",
            )
        },
        "timing": {
            "train_wall_s": m.get("train_runtime_s"),
            "train_cpu_s": m.get("train_cpu_s"),
            "run_wall_s": rec.record["timing"]["wall_s"],
            "run_cpu_s": rec.record["timing"]["cpu_s"],
        },
        "finished": rec.record.get("finished"),
        "git_commit": rec.record.get("git_commit"),
    }


def aggregate(study: Study) -> dict:
    """Everything ``study.json`` holds: the settings, every finished run and job, the cells."""
    runs, jobs = [], []
    for step in plan(study):
        rec = load_record(step, study.out)
        if rec is None:
            continue
        if step.run:
            runs.append(_run_entry(step, rec))
        else:
            jobs.append(
                {
                    "task": step.cell.task.name,
                    "regime": step.cell.regime.name,
                    "job": step.key,
                    "seed": step.seed,
                    "folder": str(rec.folder),
                    "result": rec.result,
                }
            )
    return {
        "format": STUDY_FORMAT,
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "out": str(study.out),
        "settings": study.settings.fingerprint(),
        "arms": list(study.arms),
        "seeds": list(study.seeds),
        "n_steps": len(plan(study)),
        "runs": runs,
        "jobs": jobs,
        "cells": [aggregate_cell(study, c) for c in study.cells],
    }
