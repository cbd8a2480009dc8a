"""hf_marglik: marginal-likelihood training (Immer et al., ICML 2021) for Hugging Face fine-tuning.

Public API:

- :class:`MargLikTrainer` / :class:`MargLikTrainingArguments` — drop-in replacements for
  ``transformers.Trainer`` / ``TrainingArguments`` that learn the prior precision (and noise).
- :func:`marglik_training` — laplace-torch's function, same signature and return values.
- :class:`Laplace` — K-FAC (or diagonal, or full) Laplace approximation over the trainable
  parameters, with a log marginal likelihood that is differentiable in the prior precision and
  the observation noise.
- The options, as ``str`` Enums: :class:`Likelihood`, :class:`HessianStructure`,
  :class:`Backend`, :class:`KFACApprox`, :class:`PriorStructure`, :class:`PredType`,
  :class:`LinkApprox`, :class:`SubsetSampling`.
- :func:`calibration_metrics` — accuracy, NLL, ECE and Brier score of predicted probabilities.
"""

from .laplace import Laplace
from .marglik import marglik_training
from .metrics import calibration_metrics
from .options import (
    Backend,
    HessianStructure,
    KFACApprox,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetSampling,
)
from .trainer import MargLikTrainer
from .training_args import MargLikTrainingArguments

__all__ = [
    "MargLikTrainer",
    "MargLikTrainingArguments",
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
    "calibration_metrics",
]

__version__ = "0.1.0"
