"""LoRA-specific settings of the prior: which tensors share a precision, and B-only adapters.

A LoRA adapter ``ΔW = s·B·A`` has a symmetry: ``(B, A) → (B·M, M⁻¹·A)`` leaves the network
unchanged but changes ``‖A‖² + ‖B‖²`` and the K-FAC log-determinant, so separate precisions for
``A`` and ``B`` measure an arbitrary balance of one function. Two remedies live here:

- :func:`lora_groups`: one group per adapter (its ``lora_A`` and ``lora_B`` together) and one per
  other module (a head's weight and bias together), for tied precisions
  (``HyperOptimizer(tie_groups=...)``, the trainers' ``tie_lora_prior``);
- :func:`freeze_lora_a`: ``A`` frozen at its random initialisation, ``B`` trained (Zhu et al.,
  ICML 2024, "Asymmetry in Low-Rank Adapters of Foundation Models"): the network is then linear
  in each ``B``, with no symmetry and no prior on ``A``.

peft names the factors ``<layer>.lora_A.<adapter>.weight`` and ``<layer>.lora_B.<adapter>.weight``.
"""

from __future__ import annotations

from torch import nn

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def is_lora(name: str) -> bool:
    """Whether a parameter name is a LoRA factor's."""
    return LORA_A in f".{name}" or LORA_B in f".{name}"


def lora_groups(names: list[str]) -> list[int]:
    """The group of each trainable tensor ``names`` (``named_parameters`` order), numbered in
    order of first appearance: the factors of one LoRA adapter (same adapted layer and adapter
    name) share a group, every other tensor is grouped with the tensors of its module. A
    ``ValueError`` when no name is a LoRA factor's (nothing to tie)."""
    if not any(is_lora(n) for n in names):
        raise ValueError(
            "tie_lora_prior ties the precisions of each LoRA adapter's lora_A and lora_B, and no "
            "trainable tensor is a LoRA factor (peft's '<layer>.lora_A.<adapter>.weight'). Add "
            "LoRA adapters (peft) or leave tie_lora_prior False."
        )
    keys: dict[str, int] = {}
    groups = []
    for name in names:
        dotted = f".{name}"
        if is_lora(name):
            marker = LORA_A if LORA_A in dotted else LORA_B
            layer, rest = dotted.split(marker, 1)
            key = f"{layer[1:]}|lora|{rest.split('.', 1)[0]}"
        else:
            key = name.rsplit(".", 1)[0]
        groups.append(keys.setdefault(key, len(keys)))
    return groups


def freeze_lora_a(model: nn.Module) -> list[str]:
    """Freeze every trainable ``lora_A`` factor of ``model`` (``requires_grad=False``) at its
    current value; return their names. A ``ValueError`` when the model has none."""
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and LORA_A in f".{name}":
            p.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise ValueError(
            "freeze_lora_a trains LoRA B with A frozen at its initialisation, and the model has "
            "no trainable lora_A factor. Add LoRA adapters (peft) or leave freeze_lora_a False."
        )
    return frozen
