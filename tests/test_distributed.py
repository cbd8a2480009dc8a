"""Data-parallel curvature: 2 CPU processes (gloo) equal one process over the same data."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hf_marglik import Laplace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    torch.manual_seed(0)
    X = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, X, y


def _fit(model, batches, structure):
    prec = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    lap = Laplace(model, "classification", hessian_structure=structure, prior_precision=prec)
    lap.fit(batches)
    return lap


STRUCTURES = ["kron", "full", "diag"]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, X, y = _data()
        # each process sees every other example of each global batch of 8
        shard = [(X[i : i + 8][rank::world], y[i : i + 8][rank::world]) for i in range(0, 24, 8)]
        for structure in STRUCTURES:
            lap = _fit(model, shard, structure)
            got = {
                "H": lap.curvature_dense(),
                "lml": lap.log_marginal_likelihood(),
                "n": lap.n_data,
            }
            torch.save(got, os.path.join(out_dir, f"{structure}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model, X, y = _data()
    for structure, rank in [(s, r) for s in STRUCTURES for r in range(2)]:
        ref = _fit(model, [(X[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)], structure)
        got = torch.load(tmp_path / f"{structure}-rank{rank}.pt")
        assert got["n"] == ref.n_data == 24
        torch.testing.assert_close(got["H"], ref.curvature_dense(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["lml"], ref.log_marginal_likelihood(), rtol=1e-12, atol=0)
