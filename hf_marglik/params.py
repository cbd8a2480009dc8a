"""The trainable parameters, and the prior precision laid out over them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .options import PriorStructure


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad=True``, in
    ``model.named_parameters()`` order. This order defines the layout of every flat vector and of
    layerwise prior precisions in hf_marglik."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters (requires_grad=True). Marginal-likelihood "
            "training and the Laplace approximation act on the trainable parameters only: add "
            "LoRA adapters (peft) or unfreeze a head."
        )
    return params


def prior_size(structure: PriorStructure, sizes: list[int]) -> int:
    """Number of prior precisions for ``structure`` over tensors of the given sizes."""
    if structure == PriorStructure.SCALAR:
        return 1
    if structure == PriorStructure.LAYERWISE:
        return len(sizes)
    return sum(sizes)


def infer_prior_structure(n_prec: int, sizes: list[int]) -> PriorStructure:
    """The structure that a precision vector of length ``n_prec`` has over tensors of ``sizes``."""
    if n_prec == 1:
        return PriorStructure.SCALAR
    if n_prec == len(sizes):
        return PriorStructure.LAYERWISE
    if n_prec == sum(sizes):
        return PriorStructure.DIAG
    raise ValueError(
        f"A prior precision of length {n_prec} fits no structure: use 1 (scalar), {len(sizes)} "
        f"(layerwise, one per trainable tensor) or {sum(sizes)} (diag, one per parameter)."
    )


def per_parameter(prec: Tensor, sizes: list[int]) -> Tensor:
    """Expand a scalar, layerwise or diagonal precision vector to one entry per parameter."""
    n = prec.numel()
    if n == 1:
        return prec.reshape(1).expand(sum(sizes))
    if n == len(sizes):
        return torch.repeat_interleave(prec, torch.tensor(sizes, device=prec.device))
    if n == sum(sizes):
        return prec
    infer_prior_structure(n, sizes)  # raises with the valid lengths
    raise AssertionError


def prior_quadratic(prec: Tensor, params: list[Tensor]) -> Tensor:
    """``θᵀ P θ`` for a scalar, layerwise or diagonal precision ``prec`` over ``params``."""
    sizes = [p.numel() for p in params]
    n = prec.numel()
    if n == 1:
        return prec.reshape(()) * sum((p * p).sum() for p in params)
    if n == len(sizes):
        return sum(d * (p * p).sum() for d, p in zip(prec, params))
    flat = torch.cat([p.reshape(-1) for p in params])
    return (per_parameter(prec, sizes) * flat * flat).sum()
