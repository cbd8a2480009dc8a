"""Property-based checks of the marginal-likelihood math (hypothesis): random positive
semi-definite Kronecker factors and priors against dense references."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_marglik import Laplace

SETTINGS = settings(max_examples=40, deadline=None)


def _psd(n, rank, scale, g):
    X = torch.randn(n, rank, generator=g, dtype=torch.float64) * scale
    return X @ X.T


def _injected(seed, d_in, d_out, rank_a, rank_b, scale, likelihood="classification"):
    """A fitted Laplace over one linear layer (weight and bias) with random PSD factors."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d_in, d_out).double()
    lap = Laplace(model, likelihood)
    A, B = _psd(d_in, rank_a, scale, g), _psd(d_out, rank_b, scale, g)
    la, qa = torch.linalg.eigh(A)
    lb, qb = torch.linalg.eigh(B)
    mean = torch.randn(d_in * d_out + d_out, generator=g, dtype=torch.float64)
    sd = {
        "likelihood": likelihood,
        "hessian_structure": "kron",
        "backend": "ggn",
        "kfac_approx": "reduce",
        "param_names": lap.param_names,
        "prior_precision": torch.ones(1, dtype=torch.float64),
        "sigma_noise": torch.tensor(1.0, dtype=torch.float64),
        "temperature": 1.0,
        "n_data": 10,
        "n_outputs": d_out,
        "loss": torch.tensor(3.0, dtype=torch.float64),
        "mean": mean,
        "kron": [(lb.clamp_min(0), qb, la.clamp_min(0), qa), (lb.clamp_min(0), qb, None, None)],
    }
    lap.load_state_dict(sd)
    return lap, torch.block_diag(torch.kron(B, A), B), mean


dims = st.integers(1, 5)


@SETTINGS
@given(
    st.integers(0, 10**6),
    dims,
    dims,
    st.integers(1, 6),
    st.integers(1, 6),
    st.floats(1e-3, 1e2),
    st.floats(1e-4, 1e4),
    st.floats(1e-4, 1e4),
)
def test_eigen_log_det_equals_dense_slogdet(seed, d_in, d_out, ra, rb, scale, d1, d2):
    lap, H, mean = _injected(seed, d_in, d_out, ra, rb, scale)
    prec = torch.tensor([d1, d2], dtype=torch.float64)
    P = torch.diag(
        torch.cat(
            [
                torch.full((d_in * d_out,), d1, dtype=torch.float64),
                torch.full((d_out,), d2, dtype=torch.float64),
            ]
        )
    )
    P = P.double()
    sign, logdet = torch.linalg.slogdet(H + P)
    assert sign > 0
    ref = -3.0 - 0.5 * (logdet - torch.logdet(P) + mean @ P @ mean)
    lml = lap.log_marginal_likelihood(prec)
    assert torch.isfinite(lml)
    # the dense reference loses about n·eps·κ in the log determinant (κ the condition number)
    ev = torch.linalg.eigvalsh(H + P)
    atol = 10 * ev.numel() * torch.finfo(torch.float64).eps * float(ev.max() / ev.min())
    torch.testing.assert_close(lml, ref, rtol=1e-10, atol=max(atol, 1e-10))


@SETTINGS
@given(
    st.integers(0, 10**6),
    dims,
    dims,
    st.floats(1e-2, 1e1),
    st.floats(-3, 3),
    st.floats(-3, 3),
    st.floats(-1, 1),
)
def test_gradient_in_log_hyperparameters_equals_finite_differences(
    seed, d_in, d_out, scale, l1, l2, ls
):
    lap, _, _ = _injected(seed, d_in, d_out, d_in, d_out, scale, likelihood="regression")
    x = torch.tensor([l1, l2, ls], dtype=torch.float64, requires_grad=True)

    def f(v):
        return lap.log_marginal_likelihood(torch.exp(v[:2]), torch.exp(v[2]))

    f(x).backward()
    h = 1e-6
    fd = torch.stack(
        [
            (f(x.detach() + h * e) - f(x.detach() - h * e)) / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(x.grad, fd, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    st.integers(0, 10**6), dims, dims, st.floats(0, 1e6), st.floats(1e-8, 1e8), st.floats(1e-4, 1e4)
)
def test_log_marginal_likelihood_is_finite_for_valid_input(seed, d_in, d_out, scale, prec, sigma):
    lap, _, _ = _injected(seed, d_in, d_out, 1, 1, max(scale, 0.0) + 0.0, likelihood="regression")
    lml = lap.log_marginal_likelihood(
        torch.tensor([prec], dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    )
    assert math.isfinite(float(lml))
