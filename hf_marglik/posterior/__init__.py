"""Posteriors over the trainable parameters, one small class per curvature structure behind one
public face (:class:`Posterior`): :class:`KronPosterior` (K-FAC), :class:`DiagPosterior`,
:class:`FullPosterior`. :class:`~hf_marglik.Laplace` holds one after ``fit`` and answers
laplace-torch's API through it."""

from __future__ import annotations

from ..options import HessianStructure, coerce
from .base import Posterior
from .diag import DiagPosterior
from .full import FullPosterior
from .kron import MAX_DENSE_BLOCK, EigFactor, KronPosterior

__all__ = [
    "MAX_DENSE_BLOCK",
    "DiagPosterior",
    "EigFactor",
    "FullPosterior",
    "KronPosterior",
    "Posterior",
    "posterior_from_state",
]


def posterior_from_state(structure, sizes: list[int], sd: dict) -> Posterior:
    """The posterior that ``Posterior.state_dict`` wrote (or hf_marglik 0.1's ``kron`` / ``H``
    entries of a saved ``Laplace``)."""
    structure = coerce(HessianStructure, structure, "hessian_structure")
    if structure == HessianStructure.KRON:
        if "factors" in sd:
            return KronPosterior.from_state(sizes, sd)
        return KronPosterior.from_per_tensor(sizes, sd["kron"])
    cls = FullPosterior if structure == HessianStructure.FULL else DiagPosterior
    return cls(sizes, sd["H"])
