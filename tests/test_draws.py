"""The Monte-Carlo GGN's labels keyed by the data (hf_marglik.draws): the counter-based hash is
splitmix64's on every platform, its uniforms are uniform, an example's key ignores its padding
and tells examples apart, and so a ``backend="ggn-mc"`` fit (a pass, or online) gives the same
curvature, to float64 rounding, for any batch size, batch order or padding of the same examples.
The data-parallel counterpart (2 processes equal 1) is in tests/test_trainer_distributed.py."""

from __future__ import annotations

import pytest
import torch
from models import gpt2_lora_model, mlp_classification, mlp_regression

from hf_marglik import Laplace
from hf_marglik import batches as B
from hf_marglik.draws import (
    _GAMMA,
    LabelDraws,
    derive_seed,
    example_keys,
    mix,
    mix_int,
)
from hf_marglik.online import OnlineCurvature

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-10  # float64 sums over the same examples in another order or grouping


def test_mix_is_splitmix64_on_int64_tensors():
    # splitmix64 from seed 1234567: its published first two outputs
    assert mix_int(1234567 + _GAMMA) == 6457827717110365317
    assert mix_int(1234567 + 2 * _GAMMA) == 3203168211198807973
    values = [0, 1, -1, 2**63 - 1, -(2**63), 1234567 + _GAMMA - 2**64, 987654321987654321]
    got = mix(torch.tensor(values, dtype=torch.int64)).tolist()
    want = [mix_int(v) for v in values]
    assert [g % 2**64 for g in got] == want  # int64 arithmetic wraps modulo 2^64


def test_uniforms_are_uniform_in_the_open_interval():
    n, t = 4000, 25
    draws = LabelDraws(derive_seed(0, 3), torch.arange(n) * 7919, None)
    u = draws.uniforms((n, t))
    assert u.dtype == torch.float64 and bool((u > 0).all()) and bool((u < 1).all())
    se = (1 / 12 / u.numel()) ** 0.5
    assert abs(float(u.mean()) - 0.5) < 5 * se
    assert abs(float((u**2).mean()) - 1 / 3) < 5 * (4 / 45 / u.numel()) ** 0.5
    counts = torch.histc(u, bins=10, min=0, max=1)
    p = 0.1
    assert bool(((counts / u.numel() - p).abs() < 5 * (p * (1 - p) / u.numel()) ** 0.5).all())
    # another sample, step or seed gives other draws; the same gives the same
    assert torch.equal(u, LabelDraws(derive_seed(0, 3), torch.arange(n) * 7919).uniforms((n, t)))
    others = [draws.uniforms((n, t), 1), LabelDraws(derive_seed(0, 4), draws.keys).uniforms((n, t))]
    for other in others:  # independent of u: E|u - v| = 1/3
        assert abs(float((other - u).abs().mean()) - 1 / 3) < 0.01


def test_example_keys_ignore_padding_and_tell_examples_apart():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 7, 9, 0], [6, 5, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    k = example_keys(ids, mask).tolist()
    assert k[0] == k[1]  # right or left padding, any length
    assert example_keys(ids[:1, :3], None).tolist() == k[:1]  # no padding at all
    assert len({k[0], k[2], k[3]}) == 3  # a longer example, the same tokens in another order
    # float features: by their bytes; identical rows (duplicates) share their key
    x = torch.tensor(
        [[0.5, -1.0], [0.5, -1.0], [0.5, -1.0 + 2**-40], [-1.0, 0.5]], dtype=torch.float64
    )
    kx = example_keys(x).tolist()
    assert kx[0] == kx[1] and len(set(kx[1:])) == 3
    assert example_keys(x.float()).tolist()[0] == example_keys(x.float()).tolist()[1]
    with pytest.raises(TypeError, match="dict_key_x"):
        example_keys([1, 2, 3])


def test_token_draws_follow_the_token_not_its_padded_position():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [0, 0, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    d = LabelDraws.for_batch(11, ids, mask, "causal_lm")
    u = d.uniforms((2, 5))
    assert torch.equal(u[0, :3], u[1, 2:])  # the same token predicts the same next token
    alone = LabelDraws.for_batch(11, ids[:1, :4], None, "causal_lm").uniforms((1, 3))
    assert torch.equal(alone[0], u[0, :3])


def _padded_batches(examples: list[torch.Tensor], order: list[int], size: int) -> list[dict]:
    """Batches of ``size`` examples in ``order``, right-padded to the longest of each batch."""
    out = []
    for k in range(0, len(order), size):
        rows = [examples[i] for i in order[k : k + size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _tuple_batches(batches, order, size):
    x = torch.cat([b[0] for b in batches])[order]
    y = torch.cat([b[1] for b in batches])[order]
    return [(x[k : k + size], y[k : k + size]) for k in range(0, len(order), size)]


def _problem(likelihood: str):
    """A tiny float64 model and ``regroup(order, size)``: its 10 examples batched anew."""
    if likelihood == "causal_lm":
        model = gpt2_lora_model(vocab=12, seed=0)
        g = torch.Generator().manual_seed(1)
        examples = [
            torch.randint(1, 12, (int(n),), generator=g) for n in [3, 7, 5, 6, 4, 7, 2, 5, 6, 3]
        ]
        return model, lambda order, size: _padded_batches(examples, order, size)
    make = mlp_classification if likelihood == "classification" else mlp_regression
    model, batches = make(n_batches=2, batch=5)
    return model, lambda order, size: _tuple_batches(batches, order, size)


def _fit(model, likelihood, batches, structure, seed=3):
    lap = Laplace(
        model, likelihood, hessian_structure=structure, backend="ggn-mc", n_mc_samples=2, seed=seed
    )
    return lap.fit(batches)


@pytest.mark.parametrize(
    "likelihood, structure",
    [("classification", "kron"), ("regression", "diag"), ("causal_lm", "kron")],
)
def test_a_pass_gives_the_same_curvature_for_any_batching(likelihood, structure):
    """The same 10 examples in one batch, in batches of 3 in reverse order, and one by one (for
    the causal LM each batch padded to its own longest example): the same curvature and loss to
    float64 rounding; another seed gives another curvature."""
    model, regroup = _problem(likelihood)
    ref = _fit(model, likelihood, regroup(list(range(10)), 10), structure)
    for order, size in [(list(range(9, -1, -1)), 3), (list(range(10)), 1)]:
        lap = _fit(model, likelihood, regroup(order, size), structure)
        torch.testing.assert_close(
            lap.curvature_dense(), ref.curvature_dense(), rtol=RTOL, atol=1e-12
        )
        torch.testing.assert_close(lap.loss, ref.loss, rtol=RTOL, atol=0)
    other = _fit(model, likelihood, regroup(list(range(10)), 10), structure, seed=4)
    assert not torch.allclose(other.curvature_dense(), ref.curvature_dense(), rtol=1e-3)


def _online(model, micro_batches, step) -> Laplace:
    """The fit of an online window of one sampled step made of ``micro_batches``."""
    lap = Laplace(model, "causal_lm", backend="ggn-mc")
    on = OnlineCurvature.for_laplace(lap, every=1, seed=5)
    for b in micro_batches:
        x, y = B.split_batch(b, "input_ids", "labels")
        with on.recording(model) as rec, torch.enable_grad():
            logits = B.call_model(model, x, "input_ids")
            t = B.targets_for(logits, y, "causal_lm", x["attention_mask"])
            on.add(rec, t, x["attention_mask"], x["input_ids"], step)
    return lap.fit_from(on.result(100))


def test_online_step_gives_the_same_curvature_for_any_micro_batching():
    """An online step's curvature is that of its examples however they are split into
    micro-batches (data-parallel shards or gradient accumulation), and equals a pass over them
    keyed by the same step."""
    model, regroup = _problem("causal_lm")
    model.eval()  # no dropout in this model; eval keeps it explicit
    ref = _online(model, regroup(list(range(10)), 10), step=7).curvature_dense()
    split = _online(model, regroup([4, 1, 8, 0, 2, 9, 3, 7, 5, 6], 4), step=7)
    torch.testing.assert_close(split.curvature_dense(), ref, rtol=RTOL, atol=1e-12)
    later = _online(model, regroup(list(range(10)), 10), step=8).curvature_dense()
    assert not torch.allclose(later, ref, rtol=1e-3)
    fit = Laplace(model, "causal_lm", backend="ggn-mc", seed=derive_seed(5, 7))
    fit.fit(regroup(list(range(10)), 3), n_data=100)
    torch.testing.assert_close(fit.curvature_dense(), ref, rtol=RTOL, atol=1e-12)
