"""Model selection by the evidence: ``scripts/train.py --marglik --select KEY=V1,V2 ...``.

Every candidate of the grid (:mod:`.grid`) is one complete ``--marglik`` run, the same as
``train.py`` with the base flags, the candidate's values and
``--output_dir output_dir/candidates/<i>``: its folder holds exactly what that single run
writes. The candidate with the highest log marginal likelihood per data point of its kept
posterior (ties: the first in grid order) is chosen; its files are copied to ``output_dir``,
and :data:`SELECTION_NAME` lists every candidate. Validation and test metrics are recorded for
studies; the choice never reads them.

A finished candidate is marked by :data:`MARKER_NAME`, written last and atomically; a rerun of
the same command trains only the candidates without it (one that a SIGTERM stopped resumes from
its checkpoint, one killed otherwise starts afresh). Every candidate's configuration is parsed
before any training, so a bad value is refused up front.

Why not ``Trainer.hyperparameter_search`` here (which :class:`~hf_marglik.MargLikTrainer`
supports, with the same objective): a trial there is ``train()`` and an evaluation inside one
trainer, whose model is released when the trial ends, so a candidate's adapter, posterior,
test metrics and ``metrics.json`` would not be a single run's; and an optuna study kept in
memory forgets finished trials when the process is killed. The grid here is what optuna's
``GridSampler`` would try, in a fixed order.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import shutil
from enum import Enum
from pathlib import Path

from ..checkpoint import last_complete_checkpoint, save_json
from .config import RunConfig, parse_args
from .errors import RecipeError
from .grid import candidates, flags, without_select

SELECTION_NAME = "selection.json"
"""The selection's record in ``output_dir``: ``candidates`` (each with ``settings``,
``log_marginal_likelihood``, ``log_marginal_likelihood_per_datum``, ``n_data``,
``train_seconds``, ``validation``, ``test``, ``output_dir``), ``chosen`` (an index into
``candidates``) and ``criterion``."""
MARKER_NAME = "candidate.json"
"""A finished candidate's record in its folder, written last (atomically)."""
CANDIDATES_DIR = "candidates"


def candidate_configs(cfg: RunConfig) -> list[tuple[dict, RunConfig]]:
    """Each candidate's settings (as the parsed configuration holds them) and configuration:
    the command line without ``--select``, plus the candidate's flags and its own output
    folder. A :class:`RecipeError` names the candidate whose values do not parse."""
    base = without_select(cfg.argv or [])
    root = Path(cfg.training.output_dir) / CANDIDATES_DIR
    out = []
    for i, setting in enumerate(candidates(cfg.select)):
        argv = [*base, *flags(setting), "--output_dir", str(root / str(i))]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # parse notes: once, not per candidate
                c = parse_args(argv)
        except RecipeError as e:
            raise RecipeError(f"--select candidate {i} ({' '.join(flags(setting))}): {e}") from None
        out.append(({key: _setting(c, key) for key in setting}, c))
    return out


def _setting(cfg: RunConfig, key: str):
    """The parsed value of ``key`` in ``cfg``, as plain JSON data."""
    for group in (cfg.model, cfg.data, cfg.lora, cfg.training):
        if hasattr(group, key):
            value = getattr(group, key)
            break
    else:
        raise KeyError(key)
    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, tuple | list) else value


def select(cfg: RunConfig) -> dict:
    """Train every candidate still to train, choose by the evidence, copy the chosen run's
    files to ``output_dir`` and write :data:`SELECTION_NAME`; return its content."""
    from .run import train_run

    configs = candidate_configs(cfg)  # all parsed before any training
    out = Path(cfg.training.output_dir)
    records = []
    for i, (settings, c) in enumerate(configs):
        folder = Path(c.training.output_dir)
        marker = folder / MARKER_NAME
        if marker.is_file():
            record = json.loads(marker.read_text())
            if record["settings"] != settings:
                raise RecipeError(
                    f"{folder} holds a candidate with settings {record['settings']}, not "
                    f"{settings}: {out} holds another selection. Use a new output_dir."
                )
            print(f"--select: candidate {i} ({_describe(settings)}) is done; kept.")
            records.append(record)
            continue
        c.training.resume_from_checkpoint = _resume_point(folder)
        print(f"--select: training candidate {i + 1}/{len(configs)} ({_describe(settings)}).")
        finished = train_run(c)
        record = _record(i, settings, finished)
        del finished
        gc.collect()
        save_json(record, marker)  # last: the candidate is complete
        records.append(record)

    chosen = choose(records)
    _copy_outputs(Path(records[chosen]["output_dir"]), out)
    selection = {
        "criterion": "log_marginal_likelihood_per_datum",
        "chosen": chosen,
        "candidates": records,
    }
    save_json(selection, out / SELECTION_NAME)
    print(summary(selection))
    return selection


def _resume_point(folder: Path) -> str | None:
    """A half-finished candidate's last complete checkpoint (a SIGTERM writes one); without
    one, the folder is cleared and the candidate starts afresh."""
    if not folder.is_dir():
        return None
    try:
        return last_complete_checkpoint(str(folder))
    except ValueError:
        shutil.rmtree(folder)
        return None


def _record(i: int, settings: dict, finished) -> dict:
    """A finished candidate's entry of :data:`SELECTION_NAME`."""
    results, trainer = finished.results, finished.trainer
    validation = results.get("validation")
    if validation is None:  # the MAP's validation metrics (a run writes them with predictions)
        validation = _validation_metrics(finished)
    return {
        "index": i,
        "settings": settings,
        "log_marginal_likelihood": trainer.log_marglik,
        "log_marginal_likelihood_per_datum": trainer.log_marglik_per_datum,
        "n_data": trainer.n_data,
        "train_seconds": results["train_runtime_s"],
        "validation": validation,
        "test": results["test"],
        "output_dir": str(trainer.args.output_dir),
    }


def _validation_metrics(finished) -> dict | None:
    from .arguments import TASK_LIKELIHOOD
    from .metrics import evaluate

    split = finished.prepared.encoded.get("validation")
    if split is None or len(split) == 0:
        return None
    task = finished.results["task"]
    lm = TASK_LIKELIHOOD[task] == "causal_lm"
    loader = finished.trainer.get_eval_dataloader(split)
    return evaluate(finished.model, loader, "causal_lm" if lm else task)


def choose(records: list[dict]) -> int:
    """The index of the highest ``log_marginal_likelihood_per_datum`` (the first of equals);
    a :class:`RecipeError` when the candidates' data counts differ or none has a posterior."""
    counts = {r["n_data"] for r in records}
    if len(counts) > 1:
        raise RecipeError(
            f"The candidates count different data ({sorted(counts)}): their evidences are not "
            "comparable. Vary only keys that leave the training data as it is."
        )
    scored = [
        (r["log_marginal_likelihood_per_datum"], -i)
        for i, r in enumerate(records)
        if r["log_marginal_likelihood_per_datum"] is not None
        and math.isfinite(r["log_marginal_likelihood_per_datum"])
    ]
    if not scored:
        raise RecipeError(
            "No candidate has a posterior (no marginal-likelihood update fell within training): "
            "lower n_epochs_burnin or train longer."
        )
    return -max(scored)[1]


def _copy_outputs(source: Path, out: Path) -> None:
    """The chosen candidate's files (not its checkpoints, not its marker) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != MARKER_NAME:
            shutil.copy2(path, out / path.name)


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def summary(selection: dict) -> str:
    """One line per candidate (evidence per data point, test accuracy), the chosen one marked."""
    lines = ["Selection by the evidence (log marginal likelihood per data point):"]
    for i, r in enumerate(selection["candidates"]):
        mark = "*" if i == selection["chosen"] else " "
        ev = r["log_marginal_likelihood_per_datum"]
        test = r["test"] or {}
        acc = test.get("accuracy")
        lines.append(
            f" {mark} {i}: {_describe(r['settings'])}: "
            f"{'none' if ev is None else f'{ev:.4f}'}"
            + ("" if acc is None else f" (test accuracy {acc:.3f}, not used)")
        )
    return "\n".join(lines)
