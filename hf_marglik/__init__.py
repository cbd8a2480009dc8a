"""hf_marglik: marginal-likelihood training (Immer et al., ICML 2021) for Hugging Face fine-tuning.

Public API:

- :class:`Laplace` — K-FAC (or diagonal, or full) Laplace approximation over the trainable
  parameters, with a log marginal likelihood that is differentiable in the prior precision and
  the observation noise.
- The options, as ``str`` Enums: :class:`Likelihood`, :class:`HessianStructure`,
  :class:`Backend`, :class:`KFACApprox`, :class:`PriorStructure`.
"""

from .laplace import Laplace
from .options import Backend, HessianStructure, KFACApprox, Likelihood, PriorStructure

__all__ = [
    "Laplace",
    "Likelihood",
    "HessianStructure",
    "Backend",
    "KFACApprox",
    "PriorStructure",
]

__version__ = "0.1.0"
