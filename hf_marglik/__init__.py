"""hf_marglik: marginal-likelihood training (Immer et al., ICML 2021) for Hugging Face fine-tuning.

Public API:

- :class:`Laplace` — K-FAC (or diagonal, or full) Laplace approximation over the trainable
  parameters, with a log marginal likelihood that is differentiable in the prior precision and
  the observation noise.
- The options, as ``str`` Enums: :class:`Likelihood`, :class:`HessianStructure`,
  :class:`Backend`, :class:`KFACApprox`, :class:`PriorStructure`, :class:`PredType`,
  :class:`LinkApprox`.
- :func:`calibration_metrics` — accuracy, NLL, ECE and Brier score of predicted probabilities.
"""

from .laplace import Laplace
from .metrics import calibration_metrics
from .options import (
    Backend,
    HessianStructure,
    KFACApprox,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
)

__all__ = [
    "Laplace",
    "Likelihood",
    "HessianStructure",
    "Backend",
    "KFACApprox",
    "PriorStructure",
    "PredType",
    "LinkApprox",
    "calibration_metrics",
]

__version__ = "0.1.0"
