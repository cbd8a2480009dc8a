"""Speed and memory of hf_marglik: every number is a ratio of two things timed in the same run.

Measured (targets from issue 7):

1. ``hf_marglik.marglik_training`` vs laplace-torch's ``laplace.marglik_training``: same model,
   data and settings (kron, layerwise prior, Adam, ``n_hypersteps`` hyper-steps after every
   epoch). MiniLM + LoRA (r=8, query/value) + 5-way head on BBC News with the exact GGN
   (``"ggn"`` vs ``AsdlGGN``); a tiny random GPT-2 (byte-level, built from a config) + LoRA on
   ``c_attn`` with the Monte-Carlo GGN (``"ggn-mc"`` vs ``AsdlGGN(stochastic=True)``: an exact
   GGN over a 256-token vocabulary is not a "few classes" setting). Target: ours >= 1.5x faster.
2. ``MargLikTrainer`` (default marglik settings) vs a plain ``transformers.Trainer`` fine-tune of
   the same model and data, same ``TrainingArguments``. Target: time ratio <= 1.3. Also
   ``backend="ggn-mc"``, a cheap setting (``--cheap-backend``, ``--cheap-subset``; the subset is
   curvature-weighted, the default for classification), and, for the precision comparison only,
   the defaults with another data order (``data_seed``): how far the reference's own learned
   precisions move when nothing but the order of the batches changes.
3. One ``Laplace.fit`` over the training data vs one training epoch's forward+backward over the
   same batches (train mode, no optimizer step). Target <= 1.2.
4. 100 hyper-steps (``log_marginal_likelihood`` + backward + Adam on the log prior precision)
   vs one curvature fit. Target <= 0.05.
5. Peak memory of marglik training vs plain fine-tuning. Target <= 1.2.

Method. Every measured run of (1), (2) and (5) is a fresh Python process (``--worker``), so that
peak memory is per run and no allocator or hook state leaks between runs; the two sides of a
comparison alternate (A, B, A, B, ...) and each ratio is taken within a pair, then the median over
the repeats is reported (with min-max). Set-up (imports, model and data loading) is outside the
timed region. Peak memory is the peak resident set size (RSS) of the timed region: the kernel's
high-water mark is reset just before it (``echo 5 > /proc/self/clear_refs``) and ``VmHWM`` read
just after (fallback where the reset is refused: ``getrusage(RUSAGE_SELF).ru_maxrss`` of the
whole process). RSS counts everything resident: the Python runtime, torch, the model and the
training state. (3) and (4) run inside one process, interleaved, with medians over the repeats.
Wall-clock times (``time.perf_counter``). Other jobs on a shared machine inflate absolute times:
the load average is recorded before and after. Workers import a copy of ``hf_marglik/`` taken at
the start (``--no-snapshot``: the live tree), so a run measures one version of the code.

Threads. Workers run torch with ``--threads`` threads, 1 by default. On a 2-core machine that
other jobs also load (load average 5-7), two OpenMP threads per process stall at every parallel
region: a MiniLM training epoch took 8.7-17.5 s with 2 threads against 2.5-2.6 s with 1 (same
process, interleaved), and ``torch.linalg.eigh`` of a 384x384 factor 0.18 s median, up to 5.6 s,
against 0.02 s. One thread gives stable, comparable ratios; ``--threads 2`` measures the
multi-threaded case on a quiet machine.

Usage::

    python benchmarks/bench.py --quick                  # a few minutes on 2 cores
    python benchmarks/bench.py                          # full sizes (long)
    python benchmarks/bench.py --quick --write-md       # also (re)write BENCHMARKS.md's section
    python benchmarks/bench.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    ROOT,
    add_markdown_args,
    bbc_docs,
    join_section,
    load_average,
    minilm_data,
    minilm_model,
    model_builders,
    offline_environment,
    peak_rss_mb,
    print_summary,
    rss_reset,
    setup_process,
    split_section,
    training_args,
)

offline_environment()
SECTION = "## Speed and memory"

QUICK = dict(
    n_train=32, seq_len=64, batch_size=16, epochs=2, repeats=3, gpt2_n_train=64, gpt2_seq_len=128
)
FULL = dict(
    n_train=320, seq_len=128, batch_size=16, epochs=3, repeats=2, gpt2_n_train=256, gpt2_seq_len=128
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    p.add_argument("--n-train", type=int, help="MiniLM training documents")
    p.add_argument("--seq-len", type=int, help="MiniLM tokens per document")
    p.add_argument("--batch-size", type=int, help="training (and curvature) batch size")
    p.add_argument("--epochs", type=int, help="training epochs of (1), (2), (5)")
    p.add_argument("--repeats", type=int, help="repeats (pairs of runs) per ratio")
    p.add_argument("--gpt2-n-train", type=int, help="GPT-2 training sequences")
    p.add_argument("--gpt2-seq-len", type=int, help="GPT-2 bytes per sequence")
    p.add_argument("--n-hypersteps", type=int, default=10, help="hyper-steps per epoch in (1)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam step size (all runs)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: see 'Threads' in the docstring)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cheap-backend",
        default="ggn-mc",
        choices=["ggn", "ggn-mc", "ef"],
        help="(2, cheap): the curvature backend of the cheaper MargLikTrainer setting",
    )
    p.add_argument(
        "--cheap-subset",
        type=float,
        default=0.25,
        help="(2, cheap): the fraction of the training data its curvature is fit on",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=["marglik", "trainer", "kernels", "plain"],
        help="run only these groups (default: all)",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="workers import the live hf_marglik/ (default: a copy taken at the start)",
    )
    p.add_argument("--json", type=Path, help="write all raw measurements to this file")
    add_markdown_args(p, SECTION)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    return p


def settings(args) -> dict:
    base = dict(QUICK if args.quick else FULL)
    for key in base:
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    base.update(n_hypersteps=args.n_hypersteps, lr=args.lr, threads=args.threads, seed=args.seed)
    base.update(cheap_backend=args.cheap_backend, cheap_subset=args.cheap_subset)
    return base


# =============================================================================== workers
# Everything below up to the orchestrator runs inside a fresh worker process.


class Region:
    """Times a region and records its peak RSS."""

    def __enter__(self):
        import gc

        gc.collect()
        self.reset_ok = rss_reset()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak_mb = peak_rss_mb(self.reset_ok)
        self.peak_method = "VmHWM after clear_refs" if self.reset_ok else "ru_maxrss (process)"
        return False


def gpt2_data(cfg: dict) -> list[dict]:
    """Byte-level sequences (vocabulary 256) of the BBC articles: the first ``gpt2_seq_len``
    bytes of each; ``labels = input_ids`` (the model shifts)."""
    import torch

    texts, _ = bbc_docs(cfg["gpt2_n_train"], cfg["seed"] + 1)
    T = cfg["gpt2_seq_len"]
    out = []
    for t in texts:
        b = t.encode("utf-8")[:T].ljust(T, b" ")
        ids = torch.tensor(list(b), dtype=torch.long)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long), "labels": ids}
        )
    return out


def gpt2_model(cfg: dict):
    """A tiny random GPT-2 (2 layers, 128 wide, 4 heads, vocabulary 256, transformers' default
    dropout 0.1) + LoRA r=8 (alpha 16, dropout 0.1) on c_attn, in float32."""
    import torch

    return model_builders().gpt2_lora_model(
        hidden=128,
        layers=2,
        heads=4,
        vocab=256,
        r=8,
        lora_dropout=0.1,
        dropout=0.1,
        max_positions=max(cfg["gpt2_seq_len"], 64),
        attn=None,
        dtype=torch.float32,
        seed=cfg["seed"],
    )


def _logits_module(hf, flatten_lm: bool = False):
    """Wrap a Hugging Face model as ``batch dict -> logits tensor`` (laplace-torch's convention
    for models with dict inputs). ``flatten_lm``: causal-LM logits shifted and flattened to
    ``(batch·(T-1), vocab)``, matching flattened shifted labels (laplace-torch's
    ``CrossEntropyLoss`` takes one class dimension)."""
    from torch import nn

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, batch):
            out = self.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits
            if flatten_lm:
                logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            return logits

    return Logits()


def _stack(examples: list[dict]) -> dict:
    import torch

    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def _flat_lm(examples: list[dict]) -> dict:
    """laplace-torch's causal-LM batch: labels shifted and flattened."""
    b = _stack(examples)
    b["labels"] = b["labels"][:, 1:].reshape(-1)
    return b


def _loader(examples, batch_size: int, collate=_stack):
    from torch.utils.data import DataLoader

    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate)


def worker_marglik(cfg: dict, impl: str, model_name: str) -> dict:
    """(1): one marglik_training run, ours or laplace-torch's."""
    import torch

    setup_process(cfg["threads"])
    common = dict(
        likelihood="classification",
        hessian_structure="kron",
        prior_structure="layerwise",
        n_epochs=cfg["epochs"],
        n_hypersteps=cfg["n_hypersteps"],
        lr_hyp=0.1,
        prior_prec_init=1.0,
        optimizer_cls=torch.optim.Adam,
        optimizer_kwargs={"lr": cfg["lr"]},
    )
    if model_name == "minilm":
        examples, hf = minilm_data(cfg), minilm_model(cfg)
        model, loader = _logits_module(hf), _loader(examples, cfg["batch_size"])
        n_data = len(examples)
        backend = "ggn"
    else:
        examples, hf = gpt2_data(cfg), gpt2_model(cfg)
        n_data = len(examples) * (cfg["gpt2_seq_len"] - 1)
        backend = "ggn-mc"
        if impl in ("ours", "online"):
            model, loader = hf, _loader(examples, cfg["batch_size"])
            common["likelihood"] = "causal_lm"
        else:
            model = _logits_module(hf, flatten_lm=True)
            loader = _loader(examples, cfg["batch_size"], _flat_lm)
    # Both start in train mode: from_pretrained returns an eval-mode model and laplace-torch never
    # calls model.train() (it would train without dropout throughout); hf_marglik sets train
    # mode every epoch. laplace-torch still leaves the model in eval mode after its first fit.
    model.train()
    torch.manual_seed(cfg["seed"] + 7)  # dropout and Monte-Carlo draws
    if impl in ("ours", "online"):
        import hf_marglik

        # "online": the curvature from the training steps (marglik_curvature="online", budget
        # 0.25), hf_marglik's extension; "ours": laplace-torch's algorithm (a pass per update)
        extra = {"marglik_curvature": "online"} if impl == "online" else {}
        with Region() as r:
            lap, _, margliks, losses = hf_marglik.marglik_training(
                model, loader, backend=backend, **common, **extra
            )
        final = float(lap.log_marginal_likelihood())
        prec = lap.prior_precision
    else:
        import laplace
        from laplace.curvature import AsdlGGN

        lt_backend = laplace_torch_backend(AsdlGGN, stochastic=backend == "ggn-mc")
        with Region() as r:
            lap, _, margliks, losses = laplace.marglik_training(
                model, loader, backend=lt_backend, **common
            )
        final = float(lap.log_marginal_likelihood())
        prec = lap.prior_precision
    per_epoch = [
        -margliks[i] for i in range(cfg["n_hypersteps"] - 1, len(margliks), cfg["n_hypersteps"])
    ]
    kept = max(range(len(per_epoch)), key=lambda i: per_epoch[i]) + 1 if per_epoch else None
    return {
        "seconds": r.seconds,
        "peak_mb": r.peak_mb,
        "peak_method": r.peak_method,
        "n_data": n_data,
        "log_marglik_last_step": -margliks[-1],
        "log_marglik_per_epoch": per_epoch,
        "epoch_kept": kept,
        "log_marglik_returned": final,
        "prior_prec_min": float(prec.min()),
        "prior_prec_max": float(prec.max()),
        "losses": [float(x) for x in losses],
    }


def laplace_torch_backend(AsdlGGN, stochastic: bool):
    """laplace-torch's ``AsdlGGN`` (``stochastic``: Monte-Carlo), made to run on peft models:
    ASDL's ``zero_fisher`` crashes on peft's ``ModulesToSaveWrapper`` (the SEQ_CLS head) from the
    second batch on (``hasattr`` is forwarded to the wrapped head, ``delattr`` is not), so the
    ``fisher`` attributes that ASDL leaves on modules are removed before every batch. This costs
    nothing measurable and changes no number. A class, not a ``functools.partial``: laplace-torch
    reads ``backend.__name__``."""

    class AsdlGGNBench(AsdlGGN):
        def __init__(self, *a, **kw):
            super().__init__(*a, stochastic=stochastic, **kw)

        def kron(self, *a, **kw):
            for m in self.model.modules():
                m.__dict__.pop("fisher", None)
            return super().kron(*a, **kw)

    return AsdlGGNBench


def worker_trainer(cfg: dict, kind: str) -> dict:
    """(2) and (5): MargLikTrainer (its defaults: the online Monte-Carlo curvature;
    ``kind="marglik-exact"``: the exact GGN from a pass at every update, laplace-torch's and the
    earlier default; ``"marglik-mc"``: the Monte-Carlo GGN from a pass at every update;
    ``"marglik-cheap"``: a pass on a curvature-weighted subset; ``"marglik-reseed"``: the exact
    fit with another data order, the reference's own spread) or transformers.Trainer
    (``kind="plain"``)."""
    setup_process(cfg["threads"])
    from transformers import Trainer

    examples, model = minilm_data(cfg), minilm_model(cfg)
    with tempfile.TemporaryDirectory() as out:
        if kind.startswith("marglik"):
            from hf_marglik import MargLikTrainer

            exact = {"backend": "ggn", "marglik_curvature": "fit"}
            extra = {
                "marglik": {},
                "marglik-exact": exact,
                "marglik-reseed": {**exact, "data_seed": cfg["seed"] + 1},
                "marglik-mc": {"backend": "ggn-mc", "marglik_curvature": "fit"},
                "marglik-cheap": {
                    "backend": cfg["cheap_backend"],
                    "marglik_subset": cfg["cheap_subset"],
                },
            }[kind]
            args = training_args(cfg, out, True, **extra)
            trainer = MargLikTrainer(model=model, args=args, train_dataset=examples)
        else:
            trainer = Trainer(
                model=model, args=training_args(cfg, out, False), train_dataset=examples
            )
        with Region() as r:
            trainer.train()
    res = {"seconds": r.seconds, "peak_mb": r.peak_mb, "peak_method": r.peak_method}
    if kind.startswith("marglik"):
        res["log_marglik"] = trainer.best_marglik
        res["n_updates"] = len(trainer.marglik_update_steps)
        res["prior_precision"] = trainer.hyperparameters()["prior_precision"]
    return res


def precision_deviation(precision: list[float], reference: list[float]) -> tuple[float, float]:
    """Median and largest relative deviation of per-tensor prior precisions from a reference."""
    devs = sorted(abs(x / y - 1) for x, y in zip(precision, reference))
    return _median(devs), devs[-1]


def worker_plain(cfg: dict) -> dict:
    """(5b): a plain Adam fine-tuning loop (cross-entropy, no prior) with the same model, data,
    batches and epochs as marglik_training in (1)."""
    import torch
    import torch.nn.functional as F

    setup_process(cfg["threads"])
    examples, hf = minilm_data(cfg), minilm_model(cfg)
    model, loader = _logits_module(hf), _loader(examples, cfg["batch_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    torch.manual_seed(cfg["seed"] + 7)
    with Region() as r:
        for _ in range(cfg["epochs"]):
            model.train()
            for b in loader:
                opt.zero_grad()
                F.cross_entropy(model(b), b["labels"]).backward()
                opt.step()
    return {"seconds": r.seconds, "peak_mb": r.peak_mb, "peak_method": r.peak_method}


def worker_kernels(cfg: dict) -> dict:
    """(3) and (4), interleaved in one process: a training epoch's forward+backward, one
    Laplace.fit (exact GGN, and Monte-Carlo GGN), 100 hyper-steps; MiniLM and GPT-2. Also
    laplace-torch's KronLaplace.fit with AsdlGGN on MiniLM, for reference."""
    import torch
    import torch.nn.functional as F

    setup_process(cfg["threads"])
    import laplace
    from laplace.curvature import AsdlGGN

    from hf_marglik import Laplace
    from hf_marglik.hyper import HyperOptimizer
    from hf_marglik.prior import trainable_parameters

    def epoch(model, batches, lm: bool):
        model.train()
        for b in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            if lm:
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1)
                )
            else:
                loss = F.cross_entropy(logits, b["labels"])
            loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    bs = cfg["batch_size"]
    mini = minilm_model(cfg)
    mini_b = [_stack(c) for c in _chunks(minilm_data(cfg), bs)]
    gpt = gpt2_model(cfg)
    gpt_b = [_stack(c) for c in _chunks(gpt2_data(cfg), bs)]
    lt_model = _logits_module(mini)
    lt_loader = _loader([e for b in mini_b for e in _unstack(b)], bs)
    sizes = [p.numel() for _, p in trainable_parameters(mini)]
    lt_backend = laplace_torch_backend(AsdlGGN, stochastic=False)
    rows: dict[str, list[float]] = {}

    def add(key, value):
        rows.setdefault(key, []).append(value)

    torch.manual_seed(cfg["seed"])
    # warm-up (first calls allocate and initialise): one batch of each
    epoch(mini, mini_b[:1], False)
    Laplace(mini, "classification").fit(mini_b[:1])
    epoch(gpt, gpt_b[:1], True)
    Laplace(gpt, "causal_lm", backend="ggn-mc").fit(gpt_b[:1])
    for _ in range(cfg["repeats"] + 1):
        t_ep, _ = timed(lambda: epoch(mini, mini_b, False))
        t_fit, lap = timed(lambda: Laplace(mini, "classification").fit(mini_b))
        t_mc, _ = timed(lambda: Laplace(mini, "classification", backend="ggn-mc").fit(mini_b))
        t_fitb, _ = timed(lambda: Laplace(mini, "classification", batch_columns=True).fit(mini_b))
        t_jac, _ = timed(lambda lp=lap: [lp.output_jacobians(b) for b in mini_b])
        batched = Laplace(mini, "classification", batch_columns=True)
        t_jacb, _ = timed(lambda lb=batched: [lb.output_jacobians(b) for b in mini_b])
        hyper = HyperOptimizer(sizes, "classification", "layerwise", lr_hyp=0.1)
        t_hyp, _ = timed(lambda h=hyper, lp=lap: h.step(lp, 100))
        t_lt, _ = timed(
            lambda: laplace.KronLaplace(lt_model, "classification", backend=lt_backend).fit(
                lt_loader
            )
        )
        t_gep, _ = timed(lambda: epoch(gpt, gpt_b, True))
        t_gmc, _ = timed(lambda: Laplace(gpt, "causal_lm", backend="ggn-mc").fit(gpt_b))
        for k, v in dict(
            minilm_epoch=t_ep,
            minilm_fit_ggn=t_fit,
            minilm_fit_ggn_mc=t_mc,
            minilm_fit_ggn_batched=t_fitb,
            minilm_glm_jacobians=t_jac,
            minilm_glm_jacobians_batched=t_jacb,
            minilm_hyper100=t_hyp,
            minilm_fit_laplace_torch=t_lt,
            gpt2_epoch=t_gep,
            gpt2_fit_ggn_mc=t_gmc,
        ).items():
            add(k, v)
    rows.update(eigh_threads())
    return rows


def eigh_threads(n_calls: int = 12, d: int = 384) -> dict[str, list[float]]:
    """``torch.linalg.eigh`` of ``d × d`` rank-deficient PSD matrices (the shape of MiniLM's
    K-FAC factors), one call at a time as in ``Laplace.fit``, with 2 threads and with 1,
    interleaved: how much a multi-threaded LAPACK call costs on this machine now."""
    import torch

    g = torch.Generator().manual_seed(0)
    X = torch.randn(160, d, generator=g)
    M = X.T @ X / 160
    before = torch.get_num_threads()
    out: dict[str, list[float]] = {"eigh_2_threads": [], "eigh_1_thread": []}
    for _ in range(n_calls):
        for key, n in (("eigh_2_threads", 2), ("eigh_1_thread", 1)):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            torch.linalg.eigh(M)
            out[key].append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return out


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def _unstack(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


WORKERS = {
    "marglik-ours-minilm": lambda c: worker_marglik(c, "ours", "minilm"),
    "marglik-lt-minilm": lambda c: worker_marglik(c, "lt", "minilm"),
    "marglik-ours-gpt2": lambda c: worker_marglik(c, "ours", "gpt2"),
    "marglik-lt-gpt2": lambda c: worker_marglik(c, "lt", "gpt2"),
    "marglik-online-gpt2": lambda c: worker_marglik(c, "online", "gpt2"),
    "trainer-marglik": lambda c: worker_trainer(c, "marglik"),
    "trainer-plain": lambda c: worker_trainer(c, "plain"),
    "trainer-marglik-exact": lambda c: worker_trainer(c, "marglik-exact"),
    "trainer-marglik-mc": lambda c: worker_trainer(c, "marglik-mc"),
    "trainer-marglik-cheap": lambda c: worker_trainer(c, "marglik-cheap"),
    "trainer-marglik-reseed": lambda c: worker_trainer(c, "marglik-reseed"),
    "plain-loop": worker_plain,
    "kernels": worker_kernels,
}


def run_worker(name: str, cfg_json: str) -> int:
    res = WORKERS[name](json.loads(cfg_json))
    res["hf_marglik_file"] = (
        sys.modules["hf_marglik"].__file__ if "hf_marglik" in sys.modules else ""
    )
    print("BENCH_RESULT " + json.dumps(res))
    return 0


# =========================================================================== orchestrator


SNAPSHOT: Path | None = None
"""A copy of hf_marglik/ taken when the run starts; workers import it (PYTHONPATH), so that every
run of one benchmark measures the same code while the working tree changes."""


def take_snapshot() -> Path:
    import atexit
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="hf_marglik_bench_"))
    shutil.copytree(
        ROOT / "hf_marglik", folder / "hf_marglik", ignore=shutil.ignore_patterns("__pycache__")
    )
    atexit.register(shutil.rmtree, folder, True)
    return folder


def spawn(name: str, cfg: dict, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    cmd += ["--worker-config", json.dumps(cfg)]
    env = dict(os.environ)
    if SNAPSHOT is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SNAPSHOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len("BENCH_RESULT ") :])
    used = res.get("hf_marglik_file", "")
    if SNAPSHOT is not None and used and not used.startswith(str(SNAPSHOT)):
        raise RuntimeError(f"worker {name} imported {res.get('hf_marglik_file')}, not the snapshot")
    log(f"  {name}: {res.get('seconds', 0):.1f} s timed, process {wall:.0f} s")
    return res


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    def git(*a) -> str:
        try:
            return subprocess.run(
                ["git", *a], capture_output=True, text=True, cwd=ROOT, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "n/a"

    dirty = git("status", "--porcelain", "--", "hf_marglik")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git("rev-parse", "--short", "HEAD")
        + (" + uncommitted hf_marglik changes" if dirty else ""),
    }


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _spread(xs) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}" if len(xs) > 1 else "-"


class Table:
    def __init__(self):
        self.rows = []

    def add(self, key, what, ratios, target, op, detail):
        med = _median(ratios)
        ok = med >= target if op == ">=" else med <= target
        self.rows.append((key, what, med, _spread(ratios), f"{op} {target:g}", ok, detail))

    def render(self) -> str:
        head = "| # | ratio | median | min–max | target | result | medians of the parts |"
        lines = [head, "|---|---|---|---|---|---|---|"]
        for key, what, med, spread, target, ok, detail in self.rows:
            lines.append(
                f"| {key} | {what} | {med:.3f} | {spread} | {target} | "
                f"{'pass' if ok else '**miss**'} | {detail} |"
            )
        return "\n".join(lines)


def orchestrate(args, cfg: dict) -> int:
    global SNAPSHOT
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # atexit removes the snapshot
    groups = set(args.only or ["marglik", "trainer", "kernels", "plain"])
    log = print
    info = machine()
    if not args.no_snapshot:
        SNAPSHOT = take_snapshot()
        log(f"hf_marglik snapshot for the workers: {SNAPSHOT}/hf_marglik")
    load_before = load_average()
    t_start = time.time()
    log(f"machine: {info}; load average (1/5/15 min) {load_before}")
    log(f"settings: {cfg}")
    log(
        f"MiniLM: {cfg['n_train']} BBC News docs x {cfg['seq_len']} tokens, batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epochs; GPT-2: {cfg['gpt2_n_train']} seqs x "
        f"{cfg['gpt2_seq_len']} bytes; {cfg['repeats']} repeats"
    )
    raw: dict[str, list[dict]] = {}
    pairs = []
    if "marglik" in groups:
        pairs += [
            ("marglik-ours-minilm", "marglik-lt-minilm"),
            ("marglik-ours-gpt2", "marglik-lt-gpt2"),
            ("marglik-online-gpt2", None),
        ]
    if "trainer" in groups:
        pairs += [
            ("trainer-marglik", "trainer-plain"),
            ("trainer-marglik-exact", "trainer-marglik-mc"),
            ("trainer-marglik-cheap", "trainer-marglik-reseed"),
        ]
    if "plain" in groups:
        pairs += [("plain-loop", None)]
    for rep in range(cfg["repeats"] if pairs else 0):
        log(f"repeat {rep + 1}/{cfg['repeats']}")
        for a, b in pairs:
            order = (a, b) if rep % 2 == 0 else (b, a)  # alternate which side goes first
            for name in order:
                if name is not None:
                    raw.setdefault(name, []).append(spawn(name, cfg, log))
    if "kernels" in groups:
        log("kernels (one process, interleaved)")
        raw["kernels"] = [spawn("kernels", cfg, log)]

    table = Table()
    notes = []

    def paired(a, b, field="seconds"):
        return [x[field] / y[field] for x, y in zip(raw[a], raw[b])]

    def med(name, field="seconds"):
        return _median([r[field] for r in raw[name]])

    if "marglik" in groups:
        for model, label in (("minilm", "MiniLM, exact GGN"), ("gpt2", "GPT-2, MC GGN")):
            ours, lt = f"marglik-ours-{model}", f"marglik-lt-{model}"
            table.add(
                f"1 ({model})",
                f"laplace-torch / hf_marglik marglik_training time ({label})",
                paired(lt, ours),
                1.5,
                ">=",
                f"lt {med(lt):.1f} s, ours {med(ours):.1f} s",
            )
            o, t = raw[ours][0], raw[lt][0]
            notes.append(
                f"(1, {model}) log marglik, last hyper-step: ours {o['log_marglik_last_step']:.2f}, "
                f"laplace-torch {t['log_marglik_last_step']:.2f}; per epoch ours "
                f"{_fmt(o['log_marglik_per_epoch'])}, laplace-torch "
                f"{_fmt(t['log_marglik_per_epoch'])}; epoch kept ours {o['epoch_kept']}, "
                f"laplace-torch {t['epoch_kept']}; returned Laplace ours "
                f"{o['log_marglik_returned']:.2f}, laplace-torch {t['log_marglik_returned']:.2f}; "
                f"prior precision range ours [{o['prior_prec_min']:.3g}, {o['prior_prec_max']:.3g}],"
                f" laplace-torch [{t['prior_prec_min']:.3g}, {t['prior_prec_max']:.3g}]; "
                f"N ours {o['n_data']} (data points), laplace-torch len(dataset)."
            )
            notes.append(
                f"(info, {model}) peak RSS hf_marglik / laplace-torch marglik_training: "
                f"{_median(paired(ours, lt, 'peak_mb')):.2f} (ours {med(ours, 'peak_mb'):.0f} MB,"
                f" laplace-torch {med(lt, 'peak_mb'):.0f} MB)"
            )
        table.add(
            "1 (gpt2, online)",
            "laplace-torch / hf_marglik marglik_training(marglik_curvature='online') time "
            "(GPT-2, MC GGN)",
            paired("marglik-lt-gpt2", "marglik-online-gpt2"),
            1.5,
            ">=",
            f"lt {med('marglik-lt-gpt2'):.1f} s, ours online {med('marglik-online-gpt2'):.1f} s",
        )
    if "trainer" in groups:
        table.add(
            "2",
            "MargLikTrainer (defaults: online Monte-Carlo K-FAC, budget 0.25) / transformers.Trainer time",
            paired("trainer-marglik", "trainer-plain"),
            1.3,
            "<=",
            f"marglik {med('trainer-marglik'):.1f} s, plain {med('trainer-plain'):.1f} s",
        )
        table.add(
            "2 (exact)",
            "MargLikTrainer (exact GGN, a pass every epoch: the earlier default) / transformers.Trainer time",
            paired("trainer-marglik-exact", "trainer-plain"),
            1.3,
            "<=",
            f"marglik {med('trainer-marglik-exact'):.1f} s, plain {med('trainer-plain'):.1f} s",
        )
        table.add(
            "2 (mc)",
            "MargLikTrainer (Monte-Carlo GGN, a pass every epoch) / transformers.Trainer time",
            paired("trainer-marglik-mc", "trainer-plain"),
            1.3,
            "<=",
            f"marglik {med('trainer-marglik-mc'):.1f} s, plain {med('trainer-plain'):.1f} s",
        )
        table.add(
            "2 (cheap)",
            f"MargLikTrainer (backend='{cfg['cheap_backend']}', "
            f"marglik_subset={cfg['cheap_subset']}, curvature-weighted) / "
            "transformers.Trainer time",
            paired("trainer-marglik-cheap", "trainer-plain"),
            1.3,
            "<=",
            f"marglik {med('trainer-marglik-cheap'):.1f} s, plain {med('trainer-plain'):.1f} s",
        )
        n_tensors = len(raw["trainer-marglik-exact"][0]["prior_precision"])
        for kind, what in (
            ("trainer-marglik", "the defaults (online)"),
            ("trainer-marglik-mc", "the Monte-Carlo pass"),
            ("trainer-marglik-cheap", "the cheap setting"),
            ("trainer-marglik-reseed", "the exact fit with another data order (data_seed)"),
        ):
            devs = [
                precision_deviation(c["prior_precision"], f["prior_precision"])
                for c, f in zip(raw[kind], raw["trainer-marglik-exact"])
            ]
            notes.append(
                f"(2, {kind.removeprefix('trainer-')}) learned prior precision of {what} vs "
                f"the exact GGN's (a pass every epoch), relative deviation over the "
                f"{n_tensors} tensors, median / largest per repeat: "
                f"{', '.join(f'{m:.1%} / {x:.1%}' for m, x in devs)} (informative only: the "
                "outcome test is the study's)"
            )
        table.add(
            "5",
            "peak RSS MargLikTrainer / transformers.Trainer",
            paired("trainer-marglik", "trainer-plain", "peak_mb"),
            1.2,
            "<=",
            f"marglik {med('trainer-marglik', 'peak_mb'):.0f} MB, plain "
            f"{med('trainer-plain', 'peak_mb'):.0f} MB",
        )
    if "plain" in groups and "marglik" in groups:
        table.add(
            "5b",
            "peak RSS hf_marglik.marglik_training / plain Adam loop (MiniLM)",
            paired("marglik-ours-minilm", "plain-loop", "peak_mb"),
            1.2,
            "<=",
            f"marglik {med('marglik-ours-minilm', 'peak_mb'):.0f} MB, plain "
            f"{med('plain-loop', 'peak_mb'):.0f} MB",
        )
        notes.append(
            f"(info) marglik_training / plain Adam loop time (MiniLM): "
            f"{_median(paired('marglik-ours-minilm', 'plain-loop')):.2f} "
            f"(plain loop {med('plain-loop'):.1f} s)"
        )
    if "kernels" in groups:
        k = raw["kernels"][0]

        def kr(a, b):
            return [x / y for x, y in zip(k[a], k[b])]

        def km(a):
            return f"{_median(k[a]):.2f} s"

        table.add(
            "3",
            "Laplace.fit (exact GGN, default) / epoch fwd+bwd (MiniLM)",
            kr("minilm_fit_ggn", "minilm_epoch"),
            1.2,
            "<=",
            f"fit {km('minilm_fit_ggn')}, epoch {km('minilm_epoch')}",
        )
        table.add(
            "3 (mc)",
            "Laplace.fit (ggn-mc) / epoch fwd+bwd (MiniLM)",
            kr("minilm_fit_ggn_mc", "minilm_epoch"),
            1.2,
            "<=",
            f"fit {km('minilm_fit_ggn_mc')}, epoch {km('minilm_epoch')}",
        )
        table.add(
            "3 (batched)",
            "Laplace.fit (exact GGN, batch_columns=True: vmap-ed columns) / epoch (MiniLM)",
            kr("minilm_fit_ggn_batched", "minilm_epoch"),
            1.2,
            "<=",
            f"fit {km('minilm_fit_ggn_batched')}, loop {km('minilm_fit_ggn')}",
        )
        table.add(
            "3 (gpt2)",
            "Laplace.fit (ggn-mc) / epoch fwd+bwd (GPT-2)",
            kr("gpt2_fit_ggn_mc", "gpt2_epoch"),
            1.2,
            "<=",
            f"fit {km('gpt2_fit_ggn_mc')}, epoch {km('gpt2_epoch')}",
        )
        table.add(
            "4",
            "100 hyper-steps / one Laplace.fit (exact GGN, MiniLM)",
            kr("minilm_hyper100", "minilm_fit_ggn"),
            0.05,
            "<=",
            f"hyper {km('minilm_hyper100')}, fit {km('minilm_fit_ggn')}",
        )
        notes.append(
            f"(info) torch.linalg.eigh of a 384x384 factor, 2 threads / 1 thread: "
            f"{_median(k['eigh_2_threads']) / _median(k['eigh_1_thread']):.1f} (medians "
            f"{_median(k['eigh_2_threads']) * 1e3:.0f} ms / {_median(k['eigh_1_thread']) * 1e3:.0f}"
            f" ms, max {max(k['eigh_2_threads']) * 1e3:.0f} / {max(k['eigh_1_thread']) * 1e3:.0f}"
            " ms; Laplace.fit does one per K-FAC factor, 25 for MiniLM)"
        )
        notes.append(
            "(info) GLM Jacobians of the training batches (MiniLM, 5 outputs), batch_columns="
            f"True / the loop: {_median(kr('minilm_glm_jacobians_batched', 'minilm_glm_jacobians')):.2f}"
            f" (loop {km('minilm_glm_jacobians')}); exact fit batched / loop: "
            f"{_median(kr('minilm_fit_ggn_batched', 'minilm_fit_ggn')):.2f}"
        )
        notes.append(
            "(info) laplace-torch KronLaplace.fit (AsdlGGN) / hf_marglik Laplace.fit (ggn), "
            f"MiniLM: {_median(kr('minilm_fit_laplace_torch', 'minilm_fit_ggn')):.2f} "
            f"(laplace-torch {km('minilm_fit_laplace_torch')})"
        )
    load_after = load_average()
    minutes = (time.time() - t_start) / 60
    out = table.render()
    print_summary(out, notes, load_before, load_after, minutes)
    if args.json:
        args.json.write_text(json.dumps({"settings": cfg, "machine": info, "raw": raw}, indent=1))
    if args.write_md:
        write_markdown(args, cfg, info, load_before, load_after, minutes, out, notes, raw)
    return 0


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.1f}" for x in xs) + "]"


def run_mode(args, cfg: dict) -> str:
    """``quick`` or ``full`` for the presets, ``custom`` when a size was changed."""
    preset = QUICK if args.quick else FULL
    if any(cfg[k] != v for k, v in preset.items()):
        return "custom"
    return "quick" if args.quick else "full"


def write_markdown(args, cfg, info, load_before, load_after, minutes, table, notes, raw) -> None:
    """Write this run under SECTION in ``args.md``, keeping every other section; within SECTION,
    the latest quick, full and custom runs are kept side by side (one sub-section each)."""
    path = args.md
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    mode = run_mode(args, cfg)
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    block = "\n".join(
        [
            f"### {mode} run",
            "",
            f"- Command: `python benchmarks/bench.py {argv}`",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; took {minutes:.0f} min",
            f"- Machine: nproc {info['nproc']}, CPU {info['cpu']}, Python {info['python']}, "
            f"torch {info['torch']} ({cfg['threads']} torch thread(s) per process); code: git "
            f"{info['git']}; load average (1/5/15 min) before {load_before}, after "
            f"{load_after} (shared machine: other jobs ran, so absolute times are inflated; "
            "ratios are paired)",
            f"- Sizes: MiniLM {cfg['n_train']} BBC News docs x {cfg['seq_len']} tokens, batch "
            f"{cfg['batch_size']}, {cfg['epochs']} epochs, {cfg['n_hypersteps']} hyper-steps per "
            f"epoch; GPT-2 {cfg['gpt2_n_train']} sequences x {cfg['gpt2_seq_len']} bytes, batch "
            f"{cfg['batch_size']}; {cfg['repeats']} repeats",
            "",
            table,
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    intro = (
        f"{SECTION}\n\n"
        "Written by `benchmarks/bench.py` (method in its docstring): each ratio compares two things "
        "timed in the same run; runs of (1), (2), (5) are fresh processes, alternated, paired, "
        "median over repeats (min–max shown); (3), (4) run interleaved in one process; peak "
        "memory = peak RSS of the timed region (`clear_refs` reset, then `VmHWM`), which counts "
        "everything resident (runtime, imported libraries, model, training state). Targets "
        "from issue 7.\n\n"
    )
    blocks = {mode: block}
    before, body, after = split_section(text, SECTION)
    for m in re.finditer(r"^### (\w+) run\n.*?(?=^### |\Z)", body, flags=re.M | re.S):
        blocks.setdefault(m.group(1), m.group(0).rstrip("\n") + "\n")
    order = [k for k in ("quick", "full", "custom") if k in blocks]
    section = intro + "\n".join(blocks[k] for k in order)
    path.write_text(join_section(before, section, after))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.worker_config)
    return orchestrate(args, settings(args))


if __name__ == "__main__":
    sys.exit(main())
