"""The Monte-Carlo labels of ``backend="ggn-mc"``: ``columns.sample_categorical`` draws from the
categorical distribution of each row (frequencies against the probabilities, 5 standard
errors), never a zero-probability class, reproducibly, and the same in chunks as in one go."""

from __future__ import annotations

import torch

from hf_marglik import columns as C


def _rows(n: int) -> torch.Tensor:
    p = torch.tensor([0.0, 0.05, 0.45, 0.0, 0.3, 0.2], dtype=torch.float64)
    return p.expand(n, -1).contiguous()


def test_frequencies_match_the_probabilities():
    n = 200_000
    for scale in (1.0, 0.9):  # rows that do not sum to 1 are normalised
        p = _rows(n) * scale
        y = C.sample_categorical(p, torch.Generator().manual_seed(0)).flatten()
        freq = torch.bincount(y, minlength=6).double() / n
        want = p[0] / p[0].sum()
        se = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)
        assert freq[0] == 0 and freq[3] == 0  # zero-probability classes are never drawn


def test_float32_softmax_rows_stay_in_range():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 1000, generator=g) * 8
    p = torch.softmax(logits, -1)  # float32: rows sum to 1 only up to rounding
    y = C.sample_categorical(p, torch.Generator().manual_seed(2))
    assert y.shape == (300, 1) and int(y.min()) >= 0 and int(y.max()) < 1000
    assert bool((p.gather(1, y) > 0).all())


def test_reproducible_and_chunked_the_same(monkeypatch):
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(257, 50, generator=g, dtype=torch.float64), -1)
    whole = C.sample_categorical(p, torch.Generator().manual_seed(4))
    again = C.sample_categorical(p, torch.Generator().manual_seed(4))
    assert torch.equal(whole, again)
    monkeypatch.setattr(C, "SAMPLE_CHUNK", 120)  # 2 rows per chunk
    assert torch.equal(C.sample_categorical(p, torch.Generator().manual_seed(4)), whole)
