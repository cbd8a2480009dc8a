"""The one error type of the training recipe.

Everything the recipe checks before training (configuration keys, model paths, dataset columns,
label ranges, sequence lengths) raises :class:`RecipeError`; ``scripts/train.py`` prints its
message and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RecipeError(ValueError):
    """A bad input to the training recipe, found before training starts."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; ``scripts/train.py`` prints the
    message and exits with :data:`hf_marglik.preemption.SIGTERM_EXIT_CODE` (143)."""


def nearest(name: str, choices: Iterable[str]) -> str:
    """A " Did you mean ...?" hint: up to three of ``choices`` close to ``name`` (or "")."""
    matches = [repr(m) for m in difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)]
    if not matches:
        return ""
    options = matches[0] if len(matches) == 1 else ", ".join(matches[:-1]) + " or " + matches[-1]
    return f" Did you mean {options}?"
