"""The prior: a zero-mean Gaussian ``N(0, P⁻¹)`` over the trainable tensors, and the tensors
themselves.

``P`` is diagonal, laid out over the trainable tensors in ``model.named_parameters()`` order with
one of three structures (laplace-torch's): ``scalar`` (one precision for every parameter),
``layerwise`` (one per trainable tensor) or ``diag`` (one per parameter). :class:`Prior` is the
one type for it: :class:`~hf_marglik.Laplace` and the hyper-optimiser both hold one, and every
operation on ``P`` (expand it, ``θᵀPθ``, ``log det P``) is a method here. Its values may carry
gradients: the marginal likelihood is differentiated through them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .options import PriorStructure, SubsetOfWeights, coerce


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


def select_parameters(
    named: list[tuple[str, nn.Parameter]], subset_of_weights: SubsetOfWeights | str
) -> list[int]:
    """The indices into ``named`` (trainable ``(name, parameter)`` pairs in
    ``named_parameters()`` order) that ``subset_of_weights`` selects (:class:`SubsetOfWeights`).
    ``"last_layer"``: the tensors of the module that owns the last trainable tensor; where that
    module is a LoRA adapter, every adapter tensor of the layer it adapts (``lora_A`` and
    ``lora_B`` of, say, the last ``v_proj``: Laplace-LoRA's last-layer variant)."""
    subset = coerce(SubsetOfWeights, subset_of_weights, "subset_of_weights")
    if subset == SubsetOfWeights.ALL:
        return list(range(len(named)))
    owner = named[-1][0].rsplit(".", 1)[0]
    if ".lora_" in f".{owner}":
        layer = f".{owner}".split(".lora_", 1)[0][1:]
        prefix = f"{layer}.lora_" if layer else "lora_"
        return [i for i, (n, _) in enumerate(named) if n.startswith(prefix)]
    return [i for i, (n, _) in enumerate(named) if n.rsplit(".", 1)[0] == owner]


def flat_index(sizes: Sequence[int], indices: Sequence[int], device=None) -> Tensor:
    """The positions in a flat parameter vector over tensors of ``sizes`` of the entries of the
    tensors ``indices``."""
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + int(s))
    return torch.cat([torch.arange(offsets[i], offsets[i + 1], device=device) for i in indices])


class Prior:
    """The precisions ``values`` of a zero-mean Gaussian prior over tensors of ``sizes``.

    ``values`` has length 1 (scalar), ``len(sizes)`` (layerwise) or ``sum(sizes)`` (diag); any
    other length is a ``ValueError`` that names the valid ones.
    """

    def __init__(self, values: Tensor, sizes: Sequence[int]):
        self.values = values.reshape(-1)
        self.sizes = tuple(int(s) for s in sizes)
        self.structure = self.structure_of(self.values.numel(), self.sizes)

    @staticmethod
    def size(structure: PriorStructure, sizes: Sequence[int]) -> int:
        """The number of precisions of ``structure`` over tensors of ``sizes``."""
        if structure == PriorStructure.SCALAR:
            return 1
        if structure == PriorStructure.LAYERWISE:
            return len(sizes)
        return int(sum(sizes))

    @staticmethod
    def structure_of(n_values: int, sizes: Sequence[int]) -> PriorStructure:
        """The structure that ``n_values`` precisions have over tensors of ``sizes``."""
        if n_values == 1:
            return PriorStructure.SCALAR
        if n_values == len(sizes):
            return PriorStructure.LAYERWISE
        if n_values == sum(sizes):
            return PriorStructure.DIAG
        raise ValueError(
            f"A prior precision of length {n_values} fits no structure: use 1 (scalar), "
            f"{len(sizes)} (layerwise, one per trainable tensor) or {sum(sizes)} (diag, one per "
            "parameter)."
        )

    @classmethod
    def filled(
        cls, value: float, structure: PriorStructure, sizes: Sequence[int], **tensor_kw
    ) -> Prior:
        """The prior with every precision equal to ``value``, laid out as ``structure``."""
        return cls(torch.full((cls.size(structure, sizes),), float(value), **tensor_kw), sizes)

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def subset(self, indices: Sequence[int]) -> Prior:
        """The prior over the tensors ``indices`` only (same structure)."""
        sizes = [self.sizes[i] for i in indices]
        if self.structure == PriorStructure.SCALAR:
            return Prior(self.values, sizes)
        if self.structure == PriorStructure.LAYERWISE:
            return Prior(self.values[list(indices)], sizes)
        return Prior(self.values[flat_index(self.sizes, indices, self.values.device)], sizes)

    @property
    def is_point_mass(self) -> bool:
        """Whether every precision is ``+inf``: a posterior with no variance, whose predictive
        is the MAP's (the limit that ``predictive_prior='gridsearch'`` may choose)."""
        return bool(torch.isposinf(self.values).all())

    @property
    def isotropic_per_tensor(self) -> bool:
        """Whether each tensor's block of ``P`` is a multiple of the identity (not ``diag``)."""
        return self.structure != PriorStructure.DIAG

    def per_parameter(self) -> Tensor:
        """``diag(P)``: one precision per parameter, in the flat parameter order."""
        if self.structure == PriorStructure.SCALAR:
            return self.values.expand(self.n_params)
        if self.structure == PriorStructure.LAYERWISE:
            sizes = torch.tensor(self.sizes, device=self.values.device)
            return torch.repeat_interleave(self.values, sizes)
        return self.values

    def per_tensor(self) -> list[Tensor]:
        """Each tensor's precisions: a 1-element tensor (isotropic) or one per parameter."""
        if self.structure == PriorStructure.SCALAR:
            return [self.values] * len(self.sizes)
        if self.structure == PriorStructure.LAYERWISE:
            return [self.values[i : i + 1] for i in range(len(self.sizes))]
        return list(torch.split(self.values, self.sizes))

    def quadratic(self, params: Sequence[Tensor]) -> Tensor:
        """``θᵀPθ`` for the tensors ``params`` (of this prior's sizes)."""
        if self.structure == PriorStructure.DIAG:
            flat = torch.cat([p.reshape(-1) for p in params])
            return (self.values.to(flat.dtype) * flat * flat).sum()
        return self.weighted(torch.stack([(p * p).sum() for p in params]))

    def weighted(self, squared_norms: Tensor) -> Tensor:
        """``Σ_l δ_l ‖θ_l‖²`` from the tensors' squared norms (scalar and layerwise priors): the
        marginal likelihood's scatter term at a fixed mean, evaluated many times per fit."""
        if self.structure == PriorStructure.DIAG:
            raise ValueError("weighted() needs a scalar or layerwise prior; use quadratic().")
        sq = squared_norms.to(self.values.dtype)
        if self.structure == PriorStructure.SCALAR:
            return self.values.reshape(()) * sq.sum()
        return (self.values * sq).sum()

    def log_det(self) -> Tensor:
        """``log det P``."""
        if self.structure == PriorStructure.SCALAR:
            return self.n_params * torch.log(self.values).reshape(())
        if self.structure == PriorStructure.LAYERWISE:
            sizes = torch.tensor(self.sizes, dtype=self.values.dtype, device=self.values.device)
            return (sizes * torch.log(self.values)).sum()
        return torch.log(self.values).sum()
