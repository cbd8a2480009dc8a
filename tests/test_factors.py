"""Memory-bounded K-FAC factors: the streaming Nyström sketch against dense references."""

import torch
from torch import nn

from hf_marglik import Laplace
from hf_marglik.factors import (
    OVERSAMPLE,
    DenseFactor,
    SketchedFactor,
    new_factor,
    plateau_tail,
)

F64 = torch.float64


def _rows(n, d, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(
        rank, d, generator=g, dtype=F64
    )


def test_sketch_recovers_a_low_rank_factor_exactly():
    X = _rows(200, 60, rank=5)
    sk = SketchedFactor(60, rank=8, seed=0, dtype=F64, device="cpu")
    for chunk in X.split(37):  # streamed in uneven batches
        sk.add(chunk)
    lam, Q, _ = sk.eig(0.5)
    M = 0.5 * X.T @ X
    ref = torch.linalg.eigvalsh(M).flip(0)
    torch.testing.assert_close(lam[:5], ref[:5], rtol=1e-8, atol=1e-8)
    assert lam[5:].abs().max() < 1e-8  # rank 5: the rest of the spectrum is zero
    torch.testing.assert_close(Q @ torch.diag(lam[:8]) @ Q.T, M, rtol=1e-8, atol=1e-8)


def test_sketch_keeps_the_trace_and_the_leading_eigenvalues():
    g = torch.Generator().manual_seed(1)
    # a decaying spectrum
    X = torch.randn(500, 80, generator=g, dtype=F64) * torch.logspace(0, -3, 80, dtype=F64)
    sk = SketchedFactor(80, rank=20, seed=3, dtype=F64, device="cpu")
    sk.add(X)
    lam, _, _ = sk.eig(1.0)
    ref = torch.linalg.eigvalsh(X.T @ X).flip(0)
    assert lam.numel() == 80
    torch.testing.assert_close(lam.sum(), ref.sum(), rtol=1e-10, atol=0)
    # single-pass Nyström underestimates the leading eigenvalues slightly (measured: under 2%)
    assert ((lam[:5] - ref[:5]).abs() / ref[:5]).max() < 0.05
    assert (lam[:20] <= ref[:20] * (1 + 1e-9)).all()
    assert sk.Y.numel() == 80 * (20 + OVERSAMPLE)


def test_new_factor_is_dense_below_the_threshold():
    assert isinstance(new_factor(30, 10, 0, F64, "cpu"), DenseFactor)
    assert isinstance(new_factor(31, 10, 0, F64, "cpu"), SketchedFactor)
    assert isinstance(new_factor(1000, None, 0, F64, "cpu"), DenseFactor)


def _wide_model_and_data(input_rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    g = torch.Generator().manual_seed(2)
    X = _rows(60, 48, input_rank, seed=4)
    y = torch.randint(0, 3, (60,), generator=g)
    return model, [(X[:30], y[:30]), (X[30:], y[30:])]


def test_laplace_with_sketched_factors_is_exact_when_factors_have_low_rank():
    # inputs in a 4-dim subspace: the 48-wide input factor has rank 4 < factor_rank
    model, data = _wide_model_and_data(input_rank=4)
    prec = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    dense = Laplace(model, "classification", prior_precision=prec).fit(data)
    sketched = Laplace(model, "classification", prior_precision=prec, factor_rank=6).fit(data)
    B, A = sketched.posterior.block_factors(0)
    qa, qb = A.vectors, B.vectors
    assert qa.shape == (48, 6)  # the wide input factor is sketched
    assert qb.shape == (20, 20)  # 20 ≤ 2·6 + 10: kept dense
    torch.testing.assert_close(
        sketched.log_marginal_likelihood(), dense.log_marginal_likelihood(), rtol=1e-6, atol=1e-6
    )


def test_laplace_with_sketched_factors_uses_them_consistently():
    """The marginal likelihood sums over the factors' full eigenvalue lists (the tail as a
    multiset); covariance products use the tail as its mean on the complement of the kept
    eigenvectors, i.e. exactly the matrix ``curvature_dense()`` returns."""
    model, data = _wide_model_and_data(input_rank=48)
    lap = Laplace(model, "classification", prior_precision=0.7, factor_rank=6).fit(data)
    post = lap.posterior
    A = post.block_factors(0)[1]
    la, qa = A.values, A.vectors
    assert qa.shape == (48, 6) and la.numel() == 48 and la[6:].unique().numel() > 1  # a plateau
    f = lap.likelihood_factor()
    P = torch.diag(lap.prior_precision_diag)
    logdet = sum(
        torch.log(f * post.block_eigenvalues(i) + 0.7).sum() for i in range(len(lap.sizes))
    )
    ref = -lap.loss - 0.5 * (logdet - torch.logdet(P) + lap.mean @ P @ lap.mean)
    torch.testing.assert_close(lap.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-10)
    # the represented input factor: kept eigenpairs + mean of the tail on the complement
    A = qa @ torch.diag(la[:6]) @ qa.T + la[6:].mean() * (torch.eye(48, dtype=F64) - qa @ qa.T)
    torch.testing.assert_close(lap.kron_factors()[0][1], A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.sum(), torch.trace(A), rtol=1e-10, atol=0)
    # samples and the GLM predictive: the inverse of that curvature plus the prior
    Sigma = torch.linalg.inv(f * lap.curvature_dense() + P)
    torch.testing.assert_close(lap.posterior_covariance, Sigma, rtol=1e-8, atol=1e-10)


def test_plateau_tail_keeps_the_trace_and_matches_the_second_moment():
    g = torch.Generator().manual_seed(5)
    d, k = 400, 20
    # decaying spectrum, exact leading eigenvalues: the tail is a plateau below λ_k, α = 1
    lam = torch.logspace(0, -2, d, dtype=F64)
    top, tail = plateau_tail(lam[:k], d, float(lam.sum()), float((lam**2).sum()))
    torch.testing.assert_close(top, lam[:k], rtol=1e-12, atol=0)
    assert tail.max() <= lam[k - 1] and (tail[:-1] >= tail[1:]).all()
    torch.testing.assert_close(tail.sum(), lam[k:].sum(), rtol=1e-12, atol=0)
    frac = float(tail[tail < tail[0]].max()) if (tail < tail[0]).any() else 0.0
    sq = float((lam[k:] ** 2).sum())
    assert sq - frac * float(tail[0]) <= float((tail**2).sum()) <= sq * (1 + 1e-12)
    # a flat spectrum whose leading eigenvalues were underestimated (as single-pass Nyström
    # does): they are scaled up by α > 1, and both moments are kept
    flat = (1 + 0.1 * torch.rand(d // 2, generator=g, dtype=F64)).sort(descending=True).values
    full = torch.cat([flat, torch.zeros(d - d // 2, dtype=F64)])
    t1, t2 = float(full.sum()), float((full**2).sum())
    top, tail = plateau_tail(0.7 * flat[:k], d, t1, t2)
    assert (top > 0.7 * flat[:k]).all() and tail.max() <= top.min() * (1 + 1e-12)
    rep = torch.cat([top, tail])
    torch.testing.assert_close(rep.sum(), torch.tensor(t1, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close((rep**2).sum(), torch.tensor(t2, dtype=F64), rtol=2e-3, atol=0)


def test_sketch_estimates_the_second_moment_without_bias():
    """``(d/s)·‖MΩ‖_F²`` over sketches with different seeds averages to ``tr M²``."""
    X = torch.randn(300, 50, generator=torch.Generator().manual_seed(6), dtype=F64)
    M = X.T @ X
    est = []
    for seed in range(300):
        sk = SketchedFactor(50, rank=5, seed=seed, dtype=F64, device="cpu")
        Y = M @ sk.omega
        est.append(50 / sk.omega.shape[1] * float((Y * Y).sum()))
    est = torch.tensor(est, dtype=F64)
    ref = float(torch.trace(M @ M))
    assert abs(float(est.mean()) - ref) < 4 * float(est.std()) / 300**0.5
    assert abs(float(est.mean()) - ref) / ref < 0.02


class _TwoHeads(nn.Module):
    """Two linear layers that read the same input tensor unless ``x`` carries a flag."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        flag = bool(x[0, -1] > 0)
        h = x[:, :3]
        return self.a(h) + self.b(h * 2.0 if flag else h)


def test_layers_reading_one_input_share_their_input_factor_until_it_differs():
    torch.manual_seed(0)
    model = _TwoHeads().double()
    g = torch.Generator().manual_seed(1)
    same = torch.randn(6, 4, generator=g, dtype=F64)
    same[:, -1] = -1.0
    different = torch.randn(6, 4, generator=g, dtype=F64)
    different[:, -1] = 1.0
    y = torch.randint(0, 2, (6,), generator=g)
    # one batch with a shared input: one factor object, decomposed once
    lap = Laplace(model, "classification").fit([(same, y)])
    post = lap.posterior  # weights of a and b: one input factor, named by the same index
    assert post.blocks[0][1] == post.blocks[2][1] and len(post.factors) == 3  # B_a, B_b, A
    # a second batch with different inputs splits it: equal to the dense per-layer reference
    lap = Laplace(model, "classification").fit([(same, y), (different, y)])
    h1, h2 = same[:, :3], different[:, :3]
    A_a = (h1.T @ h1 + h2.T @ h2) / 12
    A_b = (h1.T @ h1 + 4 * h2.T @ h2) / 12
    (_, A1), _, (_, A2), _ = lap.kron_factors()
    torch.testing.assert_close(A1, A_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A2, A_b, rtol=1e-12, atol=1e-12)


def _sketch_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, data = _wide_model_and_data(input_rank=48)
        shard = [(x[rank::world], y[rank::world]) for x, y in data]
        lap = Laplace(model, "classification", prior_precision=0.7, factor_rank=6).fit(shard)
        got = {"lml": lap.log_marginal_likelihood(), "H": lap.curvature_dense(), "n": lap.n_data}
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sketched_factors_data_parallel_equal_one_process(tmp_path):
    """The sketch is linear in the data: 2 processes (gloo), each on half of every batch, sum
    ``Y`` and the trace and hold the single-process posterior."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sketch_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model, data = _wide_model_and_data(input_rank=48)
    ref = Laplace(model, "classification", prior_precision=0.7, factor_rank=6).fit(data)
    assert ref.posterior.block_factors(0)[1].vectors.shape == (48, 6)  # sketched
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n"] == ref.n_data == 60
        torch.testing.assert_close(got["H"], ref.curvature_dense(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got["lml"], ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
