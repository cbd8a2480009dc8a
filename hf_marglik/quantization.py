"""k-bit base models (bitsandbytes 4-bit / 8-bit, QLoRA): what the curvature sees of them, and
one guard that keeps their 4-bit layers differentiable on CPU.

On a k-bit base the trainable parameters are the LoRA factors: peft wraps each quantised target
in ``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``, whose ``lora_A`` / ``lora_B`` are
plain ``nn.Linear`` layers (float32 with peft's default ``autocast_adapter_dtype``). Those are
the curvature's sites (:func:`hf_marglik.curvature.linear_sites` hooks the modules that own a
trainable parameter); the quantised ``base_layer`` owns only frozen weights and is never hooked
or read: the curvature and the Laplace predictive's Jacobians see it as part of the function,
through its forward and its input-gradient backward.

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a ``Linear4bit`` weight for a bfloat16
inference kernel the first time the layer runs in eval mode on an input that does not require
grad (``Trainer.evaluate``, a curvature pass over a first layer, the predictive), and keeps the
repacked weight afterwards: from then on the layer computes in bfloat16 and, having no
autograd formula, passes no gradient to the layers below (measured: the LoRA factors of the
lower layers got ``grad=None`` in the next training step). :func:`keep_4bit_differentiable`
turns that repacking off (each layer then dequantises to its ``compute_dtype`` as in training);
the recipe (:mod:`hf_marglik.recipe.models`), :class:`~hf_marglik.MargLikTrainer` and
:class:`~hf_marglik.Laplace` call it on the models they are given. Where the repacking already
happened it is undone with a warning: bitsandbytes rounded the layer's block scales to bfloat16
when it repacked, and that rounding stays.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn


def kbit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The bitsandbytes 4-bit and 8-bit linear layers of ``model`` (``bitsandbytes.nn.Linear4bit``,
    ``Linear8bitLt``), by name; empty when bitsandbytes was never imported."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def is_kbit(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes k-bit layers."""
    return bool(kbit_layers(model))


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU bfloat16 inference repacking of every ``Linear4bit`` layer of
    ``model`` (see the module docstring) and restore the standard layout of any weight already
    repacked; return how many were restored. No effect on GPU layers or without bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    restored = []
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        m.support_avx512bf16_for_cpu = False
        state = getattr(m.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            m.state_dict()  # bitsandbytes restores the standard layout to save the weight
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    f"{name}: bitsandbytes repacked this 4-bit weight for bfloat16 CPU "
                    "inference, which passes no gradient, and it could not be restored. Rebuild "
                    "the model and train it before any eval-mode forward pass."
                )
            restored.append(name)
    if restored:
        warnings.warn(
            f"{len(restored)} 4-bit layer(s) ({restored[0]}, ...) had been repacked by "
            "bitsandbytes for bfloat16 CPU inference, which passes no gradient; restored to the "
            "standard layout, but their block scales keep bitsandbytes' bfloat16 rounding. Call "
            "hf_marglik.quantization.keep_4bit_differentiable(model) before the first eval-mode "
            "forward pass to avoid it.",
            stacklevel=2,
        )
    return len(restored)
