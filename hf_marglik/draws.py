"""Random draws of the Monte-Carlo GGN (``backend="ggn-mc"``) keyed by the data, not by the
process or the batch: the same examples get the same sampled labels for any number of
data-parallel processes, batch size or batch order.

An example's key is a 64-bit hash of its main input (``dict_key_x``): the values of its
non-padding entries (``attention_mask``) in order, so the padding's length and side do not enter;
floating-point inputs are hashed by their bytes. Two identical examples get the same key, hence
the same labels (as one example counted twice would). The uniform behind the label of one output
is a counter-based hash of ``(seed, step, sample, key, position)``: ``position`` is the index of
the token among the example's non-padding tokens (causal LM), of the output (regression), or 0
(classification). The arithmetic is splitmix64's (Steele, Lea & Flood 2014) on int64 tensors,
which wrap modulo ``2⁶⁴``: vectorised over the batch and the same on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .options import Likelihood

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio times 2⁶⁴)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's finaliser multipliers


def _signed(v: int) -> int:
    """``v`` modulo ``2⁶⁴`` as a signed 64-bit integer (the value an int64 tensor holds)."""
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def mix_int(v: int) -> int:
    """splitmix64's finaliser of ``v`` (modulo ``2⁶⁴``), a Python integer in ``[0, 2⁶⁴)``."""
    v &= _MASK64
    v = ((v ^ (v >> 30)) * _M1) & _MASK64
    v = ((v ^ (v >> 27)) * _M2) & _MASK64
    return v ^ (v >> 31)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 ``x`` by ``k`` bits (``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix(x: Tensor) -> Tensor:
    """:func:`mix_int` elementwise on an int64 tensor (its bits read as unsigned)."""
    x = (x ^ _shr(x, 30)) * _signed(_M1)
    x = (x ^ _shr(x, 27)) * _signed(_M2)
    return x ^ _shr(x, 31)


def derive_seed(*values: int) -> int:
    """A 64-bit seed (signed) from integers, e.g. ``(seed, step)``: each value mixed in turn."""
    h = 0
    for v in values:
        h = mix_int(h + _GAMMA + mix_int(int(v)))
    return _signed(h)


def _as_int64(x: Tensor) -> Tensor:
    """``x``'s entries as int64: integers as they are, floating point by their bits."""
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.is_floating_point():
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
        return x.contiguous().view(bits).to(torch.int64)
    return x.to(torch.int64)


def _attended(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Which entries of ``x`` (flattened per example) are data: the attention mask broadcast
    over ``x``'s trailing dimensions where it fits ``x``'s leading ones, else all."""
    n = x.shape[0]
    if attention_mask is None or tuple(attention_mask.shape) != tuple(
        x.shape[: attention_mask.ndim]
    ):
        return torch.ones(n, x[0].numel(), dtype=torch.bool, device=x.device)
    m = attention_mask.bool().reshape(
        *attention_mask.shape, *([1] * (x.ndim - attention_mask.ndim))
    )
    return m.expand(x.shape).reshape(n, -1)


def example_keys(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """One 64-bit key per example (int64, ``(n,)``): a hash of the values of its attended entries
    of ``x`` and their order among them (see the module docstring)."""
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise TypeError(
            "backend='ggn-mc' keys its sampled labels by a hash of each example's input under "
            f"dict_key_x, which must be a tensor with a batch dimension; got {type(x).__name__}. "
            "Set dict_key_x to the key of the model's main input tensor."
        )
    n = x.shape[0]
    v = _as_int64(x).reshape(n, -1)
    m = _attended(x, attention_mask)
    rank = m.long().cumsum(1)
    terms = mix(mix(v) + rank * _signed(_GAMMA)) * m.long()
    return mix(terms.sum(1) + m.long().sum(1) * _signed(mix_int(_GAMMA)))


def token_positions(n: int, length: int, attention_mask: Tensor | None, device) -> Tensor:
    """Each token's index among its example's attended tokens (``(n, length)``); padding gets
    the index of the token before it, which does not matter: it is no data point."""
    if attention_mask is None or attention_mask.shape != (n, length):
        return torch.arange(length, device=device).expand(n, length)
    return attention_mask.long().cumsum(1).clamp_min(1) - 1


@dataclass
class LabelDraws:
    """The uniforms behind one batch's Monte-Carlo labels: ``seed`` (already mixed with the step
    or fit), ``keys`` (``(n,)``, :func:`example_keys`) and ``positions`` (the leading shape of
    the data points, ``(n, …)``), or None: the flat index of an output within its example."""

    seed: int
    keys: Tensor
    positions: Tensor | None = None

    @classmethod
    def for_batch(
        cls, seed: int, x: Tensor, attention_mask: Tensor | None, likelihood: Likelihood
    ) -> LabelDraws:
        """The draws of a batch of main inputs ``x``: for a causal LM, the token positions of the
        shifted logits (position ``t`` predicts token ``t + 1``)."""
        keys = example_keys(x, attention_mask)
        positions = None
        if likelihood == Likelihood.CAUSAL_LM and x.ndim >= 2:
            n, length = x.shape[:2]
            positions = token_positions(n, length, attention_mask, x.device)[:, :-1]
        return cls(int(seed), keys, positions)

    def uniforms(self, shape: tuple[int, ...], sample: int = 0) -> Tensor:
        """float64 uniforms in the open interval ``(0, 1)`` of shape ``shape`` (``(n, …)``), one
        per output of sample ``sample``: a splitmix64 stream per example and sample, indexed by
        the position."""
        n, rest = shape[0], tuple(shape[1:])
        if n != self.keys.shape[0]:
            raise ValueError(f"{n} rows of draws for {self.keys.shape[0]} example keys.")
        base = _signed(mix_int(self.seed + _GAMMA * (sample + 1)))
        state = mix(self.keys ^ base).reshape(n, *([1] * len(rest)))
        if self.positions is not None:
            if tuple(self.positions.shape) != tuple(shape):
                raise ValueError(f"positions {tuple(self.positions.shape)} for draws {shape}.")
            idx = self.positions.to(self.keys.device)
        else:
            idx = torch.arange(math.prod(rest), device=self.keys.device).reshape(1, *rest)
        h = mix(state + (idx + 1) * _signed(_GAMMA))
        return (_shr(h, 12).to(torch.float64) + 0.5) * 2.0**-52
