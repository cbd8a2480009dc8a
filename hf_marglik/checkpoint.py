"""Files: the marginal-likelihood state in a checkpoint, atomic writes, the last complete
checkpoint of an output folder.

A checkpoint folder ``checkpoint-<step>`` written by a marginal-likelihood trainer holds the
Trainer's own files and :data:`STATE_NAME`, written last and atomically (a temporary file moved
into place), so the presence of :data:`STATE_NAME` means the folder is complete.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable

import torch

STATE_NAME = "marglik_state.pt"
"""Extra training state in each checkpoint folder (hyper-optimiser, best model, histories)."""
HYPERPARAMETERS_NAME = "marglik_hyperparameters.json"
"""The learned hyperparameters, written by ``save_model`` beside the model or adapter."""
PRIOR_PRECISION_NAME = "marglik_prior_precision.safetensors"
"""A diagonal prior precision too long for :data:`HYPERPARAMETERS_NAME` (key
``prior_precision``), written by ``save_model``."""
PREFIX_CHECKPOINT_DIR = "checkpoint"
"""The Trainer's checkpoint folder prefix (``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``)."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` and move ``tmp`` to ``path``: never a partial file at ``path``."""
    tmp = f"{os.fspath(path)}.tmp"
    write(tmp)
    os.replace(tmp, path)


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj, path: str | os.PathLike) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write)


def checkpoint_folder(output_dir: str, step: int) -> str:
    """The Trainer's folder for the checkpoint at global step ``step``."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def last_complete_checkpoint(output_dir: str | None) -> str:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the highest step that holds
    :data:`STATE_NAME`; later folders without it (a kill while saving) are skipped with a
    warning. A ``ValueError`` when there is none."""
    if not output_dir or not os.path.isdir(output_dir):
        raise ValueError(f"No checkpoint in output_dir={output_dir!r} to resume from.")
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    incomplete = []
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(folder, STATE_NAME)):
            if incomplete:
                warnings.warn(
                    f"Skipping incomplete checkpoint(s) {', '.join(incomplete)} (no "
                    f"{STATE_NAME}: the run was killed while saving?); resuming from {folder}.",
                    UserWarning,
                    stacklevel=3,
                )
            return folder
        incomplete.append(name)
    if incomplete:
        raise ValueError(
            f"No complete marginal-likelihood checkpoint in output_dir={output_dir!r}: "
            f"{', '.join(reversed(incomplete))} lack {STATE_NAME}. Start without "
            "resume_from_checkpoint."
        )
    raise ValueError(f"No checkpoint in output_dir={output_dir!r} to resume from.")
