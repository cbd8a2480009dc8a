"""hf_marglik: marginal-likelihood training (Immer et al., ICML 2021) for Hugging Face fine-tuning.

Public API:

- :class:`MargLikTrainer` / :class:`MargLikTrainingArguments` — drop-in replacements for
  ``transformers.Trainer`` / ``TrainingArguments`` that learn the prior precision (and noise).
- :class:`MargLikSFTTrainer` / :class:`MargLikSFTConfig` — the same for TRL's ``SFTTrainer`` /
  ``SFTConfig`` (needs ``pip install hf_marglik[trl]``).
- :func:`marglik_training` — laplace-torch's function, same signature and return values.
- :class:`Laplace` — K-FAC (or diagonal, or full) Laplace approximation over the trainable
  parameters, with a log marginal likelihood that is differentiable in the prior precision and
  the observation noise.
- The options, as ``str`` Enums: :class:`Likelihood`, :class:`HessianStructure`,
  :class:`Backend`, :class:`KFACApprox`, :class:`PriorStructure`, :class:`PredType`,
  :class:`LinkApprox`, :class:`SubsetSampling`, :class:`TuningMethod`, :class:`CurvatureSource`,
  :class:`PredictivePrior`, :class:`SubsetOfWeights`, :class:`PriorMean`, :class:`PriorApplication`.
- :func:`calibration_metrics` — accuracy, NLL, ECE and Brier score of predicted probabilities.
"""

import importlib
import importlib.util

from .laplace import Laplace
from .marglik import marglik_training
from .metrics import calibration_metrics
from .options import (
    Backend,
    CurvatureSource,
    HessianStructure,
    KFACApprox,
    Likelihood,
    LinkApprox,
    PredictivePrior,
    PredType,
    PriorApplication,
    PriorMean,
    PriorStructure,
    SubsetOfWeights,
    SubsetSampling,
    TuningMethod,
)

# The Trainer classes load transformers.Trainer, which brings datasets, pandas and pyarrow
# (about 85 MB resident): imported on first use, so that Laplace and marglik_training alone
# do not pay for them.
# The SFT classes need TRL, an optional extra: without it they raise an ImportError that says
# how to install it, on first use, and `from hf_marglik import *` leaves them out.
_LAZY = {
    "MargLikTrainer": ".trainer",
    "MargLikTrainingArguments": ".training_args",
    "MargLikSFTTrainer": ".sft",
    "MargLikSFTConfig": ".sft",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "MargLikTrainer",
    "MargLikTrainingArguments",
    "MargLikSFTTrainer",
    "MargLikSFTConfig",
    "marglik_training",
    "Laplace",
    "Likelihood",
    "HessianStructure",
    "Backend",
    "KFACApprox",
    "PriorStructure",
    "SubsetSampling",
    "PredType",
    "LinkApprox",
    "TuningMethod",
    "CurvatureSource",
    "PredictivePrior",
    "SubsetOfWeights",
    "PriorApplication",
    "PriorMean",
    "calibration_metrics",
]
if importlib.util.find_spec("trl") is None:
    __all__ = [n for n in __all__ if not n.startswith("MargLikSFT")]

__version__ = "0.1.0"
