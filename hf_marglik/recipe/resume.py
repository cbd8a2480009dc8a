"""Training with resume and SIGTERM handling for ``scripts/train.py``.

``--resume_from_checkpoint true`` continues from the last checkpoint in ``output_dir`` (for
``--marglik``: the last *complete* one, see ``MargLikTrainer.train``), ``--resume_from_checkpoint
PATH`` from that folder. On SIGTERM the run writes ``output_dir/checkpoint-<step>`` at the next
optimizer step and raises :class:`~hf_marglik.recipe.errors.TrainingInterrupted`: the script
prints how to resume and exits with status 143; no final outputs are written.
"""

from __future__ import annotations

import os

from ..preemption import SigtermCheckpointCallback
from .errors import RecipeError, TrainingInterrupted


def resume_target(trainer) -> str | None:
    """The checkpoint folder to resume from (None: start afresh); a :class:`RecipeError` when
    ``resume_from_checkpoint`` names nothing to resume from."""
    value = trainer.args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "0"):
        return None
    out = trainer.args.output_dir
    if str(value).lower() not in ("true", "yes", "1"):
        if not os.path.isdir(value):
            raise RecipeError(f"resume_from_checkpoint={value!r} is not a checkpoint folder.")
        return str(value)
    if hasattr(trainer, "sigterm_callback"):  # MargLikTrainer: the last complete checkpoint
        from ..checkpoint import last_complete_checkpoint

        try:
            return last_complete_checkpoint(out)
        except ValueError as e:
            raise RecipeError(f"resume_from_checkpoint=true: {e}") from None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    if last is None:
        raise RecipeError(
            f"resume_from_checkpoint=true but output_dir={out!r} holds no checkpoint-* folder."
        )
    return last


def train(trainer) -> None:
    """``trainer.train()`` with resume and SIGTERM checkpointing (MargLikTrainer has its own
    SIGTERM callback; a plain ``Trainer`` gets one here)."""
    resume = resume_target(trainer)
    stop = getattr(trainer, "sigterm_callback", None)
    if hasattr(trainer, "sigterm_callback"):
        trainer.train(resume_from_checkpoint=resume)
    else:
        stop = SigtermCheckpointCallback()
        trainer.add_callback(stop)
        with stop:
            trainer.train(resume_from_checkpoint=resume)
    if stop is not None and stop.stopped_at is not None:
        folder = os.path.join(trainer.args.output_dir, f"checkpoint-{stop.stopped_at}")
        raise TrainingInterrupted(
            f"stopped by SIGTERM after step {stop.stopped_at}; checkpoint saved in {folder}. "
            "Resume with the same command plus --resume_from_checkpoint true."
        )
