"""Memory of the K-FAC curvature state for LoRA on a LLaMA-2-7B-shaped model (issue 6).

Target (issue 6): the curvature state of LoRA r=8 on ``q_proj`` and ``v_proj`` of a
32-layer, 4096-wide LLaMA-2-7B-shaped model under 1 GiB in float32, with the log marginal
likelihood within 1% of the dense one.

Set-up. A ``LlamaForCausalLM`` built from a ``LlamaConfig`` with LLaMA-2-7B's layer shapes
(hidden 4096, intermediate 11008, 32 heads of 128, no grouped-query attention) but
``--layers`` (2) layers, float32, random init with a fixed seed (nothing is downloaded), and
peft LoRA r=8 (alpha 16, no dropout) on ``q_proj`` and ``v_proj``. peft starts LoRA ``B`` at
zero, which makes the output gradient of LoRA ``A`` (and so its curvature) exactly zero; ``B``
is therefore drawn N(0, ``--lora-b-std``²), as after some training. Data: the first
``--n-seq`` BBC News articles (bundled corpus, seeded shuffle) tokenised with SmolLM2's
tokenizer (bundled GGUF), ``--seq-len`` tokens each, no padding, one causal-LM target per token
after the first.

Vocabulary. The token ids that occur in the data are renumbered 0..V-1 and the model's vocabulary
is V (about 1,500 at the default sizes) instead of SmolLM2's 49,152. With random embeddings a
renumbering is a relabelling that changes nothing, and the vocabulary size does not enter the
curvature state: the LoRA factors are 4096 × 4096 (the input of LoRA A, the output of LoRA B)
and 8 × 8 whatever the vocabulary; it only sets the size of the frozen embedding and output
layers (time and RSS) and which tokens the Monte-Carlo targets are drawn from.

Backend ``ggn-mc``: the exact GGN needs one backward pass per vocabulary entry and target token
(hf_marglik refuses it above 1,024 outputs); the one-sample Monte-Carlo GGN needs one backward
per batch and is what a causal LM uses (README, configs/smollm2_causal_lm.yaml). All fits use
the same ``seed``, so they see the same sampled targets: the only difference between the dense
and the sketched fits is the factor storage.

Measured per ``factor_rank`` (``None`` = dense factors, then each of ``--ranks``):

* curvature state: bytes of the posterior's K-FAC factors (``Laplace.posterior.factors``: eigenvalues and
  eigenvectors per factor; a factor shared by two layers, the input of LoRA A of ``q_proj`` and
  ``v_proj``, counted once), per layer, and extrapolated to ``--target-layers`` layers (every
  layer has the same shapes, so the state scales exactly with the layer count);
* accumulators: bytes of the factor objects a fit holds while it streams over the data
  (``hf_marglik.factors``: dense ``M`` of ``d²``, or the sketch ``Y`` and ``Ω`` of
  ``d·(rank + oversample)`` each), built with ``new_factor`` for the factor sides of the state;
* log marginal likelihood at a scalar prior precision ``δ*`` (the maximiser of the dense one:
  what the hyper-steps move towards), ``δ*/10`` and ``10·δ*``, and its relative error against
  dense; also the relative error of the Occam term ``½(log det(H + P) − log det P)``, which is
  the only part that the factor storage changes (the data fit ``−L`` and ``θᵀPθ`` are shared)
  and is the stricter measure; and ``δ*`` of the sketched fit against the dense one;
* fit time (wall clock) and peak RSS of the fit (``VmHWM`` after ``clear_refs``; it counts the
  model too, so the increase over the RSS before the fit is shown as well).

Caveat: random-init weights and a few thousand tokens give factor spectra unlike those of a
pretrained 7B on real data (an input factor seen over ``n`` tokens has rank at most ``n``;
a pretrained model's activations have a few very large directions). The memory figures do not
depend on that; the accuracy figures do.

Usage::

    python benchmarks/bench_memory.py                 # print the table
    python benchmarks/bench_memory.py --write-md      # also (re)write BENCHMARKS.md's section
    python benchmarks/bench_memory.py --replay dense.pt   # accuracy only, from saved dense factors

``--replay PATH`` skips the fits: PATH is a ``torch.save`` of a dense fit's ``{"names":
param_names, "factors": kron_factors(), "kron": [(λ_B, Q_B, λ_A, Q_A) per tensor] (hf_marglik 0.1's
layout, from ``posterior.block_factors(i)``), "loss", "mean", "n_data"}``, and each
sketch is applied to the dense ``M`` with the seed the fit would use (``Y = MΩ`` is linear in
the data, so this equals streaming up to float rounding). It prints the accuracy columns of
the table (memory columns as above; no fit time or RSS).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

from benchlib import (
    add_markdown_args,
    join_section,
    load_average,
    model_builders,
    offline_environment,
    print_summary,
    rss_reset,
    split_section,
    status_mb,
)

offline_environment()
SECTION = "## 7B-shaped memory (issue 6)"
MIB, GIB = 2**20, 2**30


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=2, help="decoder layers built and measured")
    p.add_argument("--target-layers", type=int, default=32, help="layers extrapolated to")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size")
    p.add_argument("--intermediate", type=int, default=11008, help="MLP size")
    p.add_argument("--heads", type=int, default=32, help="attention heads")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-b-std", type=float, default=0.02, help="std of the LoRA B draw")
    p.add_argument("--n-seq", type=int, default=32, help="BBC News articles")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per article")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[64, 128, 256], help="factor_rank values"
    )
    p.add_argument("--budget-gib", type=float, default=1.0, help="the memory target")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    add_markdown_args(p, SECTION)
    p.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="saved dense factors: replay the sketches on them instead of fitting (no --write-md)",
    )
    return p


# ------------------------------------------------------------------------------ measuring
# ------------------------------------------------------------------------------ model, data
def text_batches(args) -> tuple[list[dict], int]:
    """``--n-seq`` BBC News articles of exactly ``--seq-len`` SmolLM2 tokens, in batches, with
    the token ids renumbered to 0..V-1; returns the batches and V."""
    import random

    import torch

    from hf_marglik.recipe.arguments import BUNDLED_SMOLLM2, ModelArguments
    from hf_marglik.recipe.data import read_bbc_news
    from hf_marglik.recipe.models import load_source

    tok = load_source(ModelArguments(model_name_or_path=BUNDLED_SMOLLM2, task="causal_lm"))
    tok = tok.tokenizer
    texts = read_bbc_news()["text"]
    random.Random(args.seed).shuffle(texts)
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][: args.seq_len]
        if len(ids) == args.seq_len:
            rows.append(ids)
        if len(rows) == args.n_seq:
            break
    ids = torch.tensor(rows)
    vocab, compact = torch.unique(ids, return_inverse=True)
    batches = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
        for x in compact.split(args.batch_size)
    ]
    return batches, int(vocab.numel())


def build_model(args, vocab: int):
    """The LLaMA of ``args`` in float32 (no grouped-query attention) + LoRA on q_proj/v_proj,
    with LoRA ``B`` drawn N(0, ``--lora-b-std``²); in eval mode."""
    import torch

    M = model_builders()
    model = M.llama_lora_model(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.heads,
        vocab=vocab,
        r=args.lora_r,
        intermediate=args.intermediate,
        max_positions=max(4096, args.seq_len),
        dtype=torch.float32,
        seed=args.seed,
    )
    M.randomise_trainable(model, args.seed + 1, args.lora_b_std, only="lora_B")
    model.eval()
    return model


def _layer(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return None if m is None else int(m.group(1))


def state_bytes(lap) -> dict:
    """Bytes of the K-FAC state (the posterior's eigendecomposed factors), a factor shared by
    several tensors counted once: total, per layer (of a factor's first user), and the same
    without sharing; the unique factor sides."""
    post = lap.posterior
    first_layer: dict[int, int | None] = {}
    unshared = 0
    for name, block in zip(lap.param_names, post.blocks):
        for k in block:
            if k is None:
                continue
            f = post.factors[k]
            unshared += f.values.nbytes + f.vectors.nbytes
            first_layer.setdefault(k, _layer(name))
    per_layer: dict[int | None, int] = {}
    for k, layer in first_layer.items():
        f = post.factors[k]
        per_layer[layer] = per_layer.get(layer, 0) + f.values.nbytes + f.vectors.nbytes
    return {
        "total": sum(per_layer.values()),
        "per_layer": per_layer,
        "unshared": unshared,
        "sides": [post.factors[k].side for k in first_layer],
    }


def accumulator_bytes(sides: list[int], rank: int | None) -> int:
    """Bytes of the factor objects a fit accumulates into, for factors of these sides."""
    import torch

    from hf_marglik.factors import DenseFactor, new_factor

    total = 0
    for d in sides:
        f = new_factor(d, rank, 0, torch.float32, torch.device("cpu"))
        tensors = [f.M] if isinstance(f, DenseFactor) else [f.Y, f.omega, f.trace]
        total += sum(t.nbytes for t in tensors)
        del f
    return total


def best_scalar_prior(lap) -> float:
    """The scalar prior precision that maximises ``lap``'s log marginal likelihood (grid over
    log10 δ in [-6, 8], then golden-section refinement)."""
    import torch

    def lml(log10_delta: float) -> float:
        d = torch.tensor([10.0**log10_delta], dtype=lap.dtype)
        return float(lap.log_marginal_likelihood(prior_precision=d))

    grid = [x / 4 for x in range(-24, 33)]
    values = [lml(x) for x in grid]
    i = max(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if lml(a) > lml(b):
            hi = b
        else:
            lo = a
    return 10.0 ** ((lo + hi) / 2)


def occam(lap, delta: float) -> float:
    """``½(log det(H + P) − log det P)`` at a scalar prior precision ``δ``."""
    import torch

    from hf_marglik.prior import Prior

    prior = Prior(torch.tensor([delta], dtype=lap.dtype), lap.sizes)
    return 0.5 * float(lap.posterior.log_det(prior, lap.likelihood_factor()) - prior.log_det())


# ------------------------------------------------------------------------------ run
def fit(model, batches, rank: int | None, seed: int) -> dict:
    from hf_marglik import Laplace

    gc.collect()
    rss_before = status_mb("VmRSS")
    reset_ok = rss_reset()
    t0 = time.perf_counter()
    lap = Laplace(
        model,
        "causal_lm",
        hessian_structure="kron",
        backend="ggn-mc",
        prior_precision=1.0,
        seed=seed,
        factor_rank=rank,
    ).fit(batches)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM") if reset_ok else float("nan")
    return {"lap": lap, "seconds": seconds, "peak_mb": peak, "rss_before_mb": rss_before}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.replay is not None:
        if args.write_md:
            raise SystemExit("--replay prints its table; --write-md is for measured fits.")
        return replay(args)
    t_start = time.time()
    load_before = load_average()
    batches, vocab = text_batches(args)
    n_tokens = sum(int(b["input_ids"].numel()) for b in batches)
    model = build_model(args, vocab)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, vocab {vocab}; {n_lora} LoRA "
        f"parameters; data: {len(batches)} batches, {n_tokens} tokens",
        flush=True,
    )

    runs = {}
    for rank in [None, *args.ranks]:
        r = fit(model, batches, rank, args.seed)
        lap = r["lap"]
        r["state"] = state_bytes(lap)
        r["acc"] = accumulator_bytes(r["state"]["sides"], rank)
        runs[rank] = r
        print(
            f"factor_rank={rank}: fit {r['seconds']:.1f} s, state {r['state']['total'] / MIB:.1f} "
            f"MiB, peak RSS {r['peak_mb']:.0f} MB",
            flush=True,
        )
    dense = runs[None]["lap"]
    for rank in args.ranks:  # the same data, model and Monte-Carlo targets
        assert float(runs[rank]["lap"].loss) == float(dense.loss)
    delta_star = best_scalar_prior(dense)
    deltas = [delta_star / 10, delta_star, delta_star * 10]
    ref = {d: float(dense.log_marginal_likelihood(torch.tensor([d]))) for d in deltas}
    ref_occam = {d: occam(dense, d) for d in deltas}

    rows = []
    for rank, r in runs.items():
        lap, st = r["lap"], r["state"]
        layers = [v for k, v in st["per_layer"].items() if k is not None]
        per_layer = sum(layers) / len(layers)
        other = st["per_layer"].get(None, 0)
        extrapolated = per_layer * args.target_layers + other
        acc_per_layer = r["acc"] / args.layers
        rel, rel_occ = [], []
        for d in deltas:
            v = float(lap.log_marginal_likelihood(torch.tensor([d])))
            rel.append(abs(v - ref[d]) / abs(ref[d]))
            rel_occ.append(abs(occam(lap, d) - ref_occam[d]) / abs(ref_occam[d]))
        own = best_scalar_prior(lap) if rank is not None else delta_star
        rows.append(
            {
                "rank": "dense" if rank is None else str(rank),
                "per_layer_mib": per_layer / MIB,
                "total_gib": extrapolated / GIB,
                "unshared_gb": (st["unshared"] / args.layers) * args.target_layers / 1e9,
                "acc_per_layer_mib": acc_per_layer / MIB,
                "acc_total_gib": acc_per_layer * args.target_layers / GIB,
                "rel": rel,
                "rel_occam": rel_occ,
                "delta_ratio": own / delta_star,
                "seconds": r["seconds"],
                "peak_mb": r["peak_mb"],
                "delta_rss_mb": r["peak_mb"] - r["rss_before_mb"],
            }
        )

    table = render(rows, args)
    lml_star = ref[delta_star]
    notes = [
        f"δ* = {delta_star:.4g} (the scalar prior precision that maximises the dense log "
        f"marginal likelihood, {lml_star:.1f}; Occam term {ref_occam[delta_star]:.1f}, data fit "
        f"−L = {-float(dense.loss):.1f} over {dense.n_data} target tokens); relative errors are "
        "given at δ*/10, δ*, 10·δ*.",
        f"Model: {args.layers} layers measured, {n_lora} LoRA parameters "
        f"({n_lora // args.layers} per layer), vocabulary {vocab} (the SmolLM2 token ids that "
        f"occur in the data, renumbered); data: {args.n_seq} BBC News articles x "
        f"{args.seq_len} tokens, batch {args.batch_size}.",
        f"Factors per layer: LoRA A of q_proj and v_proj share their {args.hidden}-wide input "
        f"factor, LoRA B has a {args.hidden}-wide output factor each, so 3 factors of side "
        f"{args.hidden} per layer (plus 8 x 8 ones); without the sharing (4 per layer, as in the "
        "issue's 8.6 GB) see the 'unshared' column.",
    ]
    load_after = load_average()
    minutes = (time.time() - t_start) / 60
    print_summary(table, notes, load_before, load_after, minutes)
    if args.write_md:
        write_markdown(args, table, notes, load_before, load_after, minutes)
    return 0


# ------------------------------------------------------------------------------ replay
def _stub_model(names: list[str], shapes: list[tuple[int, int]]):
    """Bias-free ``nn.Linear`` modules at the saved parameter names (no forward pass needed)."""
    from torch import nn

    root = nn.Module()
    for name, (d_out, d_in) in zip(names, shapes):
        *path, leaf, _ = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.add_module(leaf, nn.Linear(d_in, d_out, bias=False))
    return root


def _replayed_lap(saved: dict, rank: int | None):
    """A fitted ``Laplace`` over a stub model whose K-FAC state is the saved dense one
    (``rank`` None) or the sketches of the saved dense factors at ``factor_rank=rank``."""
    import torch

    from hf_marglik import Laplace
    from hf_marglik.factors import DenseFactor, new_factor

    kron = saved["kron"]
    shapes = [(lb.numel(), la.numel()) for lb, _, la, _ in kron]
    lap = Laplace(_stub_model(saved["names"], shapes), "causal_lm", backend="ggn-mc")
    blocks, done = [], {}

    def factor(lam, Q, M, seed):
        if rank is None:
            return lam, Q
        if id(Q) not in done:  # a shared factor is sketched once (the seed of its first use)
            f = new_factor(Q.shape[0], rank, seed, torch.float32, torch.device("cpu"))
            if isinstance(f, DenseFactor):
                done[id(Q)] = (lam, Q)
            else:
                f.Y.copy_(M.float() @ f.omega)
                f.trace.fill_(float(torch.trace(M.double())))
                done[id(Q)] = f.eig(1.0)[:2]
        return done[id(Q)]

    for i, ((lb, qb, la, qa), (B, A)) in enumerate(zip(kron, saved["factors"])):
        # the seeds of Curvature._factor: 7919 + 2·site (input factor), + 2·site + 1 (output)
        blocks.append((*factor(lb, qb, B, 7919 + 2 * i + 1), *factor(la, qa, A, 7919 + 2 * i)))
    lap.load_state_dict(
        {
            "likelihood": "causal_lm",
            "hessian_structure": "kron",
            "backend": "ggn-mc",
            "kfac_approx": lap.kfac_approx.value,
            "param_names": list(saved["names"]),
            "prior_precision": torch.ones(1),
            "sigma_noise": torch.ones(()),
            "temperature": 1.0,
            "n_data": saved["n_data"],
            "n_outputs": None,
            "loss": saved["loss"],
            "mean": saved["mean"],
            "kron": blocks,
        }
    )
    return lap


def replay(args) -> int:
    import torch

    saved = torch.load(args.replay, map_location="cpu", weights_only=False)
    n_layers = len({_layer(n) for n in saved["names"]} - {None})
    dense = _replayed_lap(saved, None)
    delta_star = best_scalar_prior(dense)
    deltas = [delta_star / 10, delta_star, delta_star * 10]
    ref = {d: float(dense.log_marginal_likelihood(torch.tensor([d]))) for d in deltas}
    ref_occam = {d: occam(dense, d) for d in deltas}
    rows = []
    for rank in [None, *args.ranks]:
        lap = dense if rank is None else _replayed_lap(saved, rank)
        st = state_bytes(lap)
        layers = [v for k, v in st["per_layer"].items() if k is not None]
        per_layer = sum(layers) / len(layers)
        acc_per_layer = accumulator_bytes(st["sides"], rank) / n_layers
        rel, rel_occ = [], []
        for d in deltas:
            v = float(lap.log_marginal_likelihood(torch.tensor([d])))
            rel.append((v - ref[d]) / abs(ref[d]))
            rel_occ.append((occam(lap, d) - ref_occam[d]) / abs(ref_occam[d]))
        own = best_scalar_prior(lap) if rank is not None else delta_star
        rows.append(
            {
                "rank": "dense" if rank is None else str(rank),
                "per_layer_mib": per_layer / MIB,
                "total_gib": (per_layer * args.target_layers + st["per_layer"].get(None, 0)) / GIB,
                "unshared_gb": (st["unshared"] / n_layers) * args.target_layers / 1e9,
                "acc_per_layer_mib": acc_per_layer / MIB,
                "acc_total_gib": acc_per_layer * args.target_layers / GIB,
                "rel": rel,
                "rel_occam": rel_occ,
                "delta_ratio": own / delta_star,
                "seconds": float("nan"),
                "peak_mb": float("nan"),
                "delta_rss_mb": float("nan"),
            }
        )
        print(f"factor_rank={rank}: done", flush=True)
    print()
    print(render(rows, args, signed=True))
    print(
        f"- δ* = {delta_star:.4g}, dense log marginal likelihood {ref[delta_star]:.1f}, Occam "
        f"term {ref_occam[delta_star]:.1f}; signed relative errors (sketched − dense)/|dense| "
        "at δ*/10, δ*, 10·δ*; replayed from "
        f"{args.replay} (no fit: times and RSS n/a)."
    )
    return 0


def render(rows: list[dict], args, signed: bool = False) -> str:
    b = args.budget_gib
    head = (
        "| factor_rank | state per layer | state, "
        f"{args.target_layers} layers | (unshared) | accumulators, {args.target_layers} layers "
        "| rel. error log marglik at δ*/10, δ*, 10δ* | rel. error Occam term | δ* (own) / δ* "
        "| fit time | peak RSS (increase) |"
    )
    lines = [head, "|" + "---|" * 10]
    fmt = "+.2e" if signed else ".2e"
    for r in rows:
        ok = "≤" if r["total_gib"] <= b else ">"
        lines.append(
            f"| {r['rank']} | {r['per_layer_mib']:.1f} MiB | **{r['total_gib']:.3f} GiB** "
            f"({ok} {b:g}) | {r['unshared_gb']:.2f} GB | {r['acc_total_gib']:.3f} GiB | "
            + ", ".join(f"{x:{fmt}}" for x in r["rel"])
            + " | "
            + ", ".join(f"{x:{fmt}}" for x in r["rel_occam"])
            + f" | {r['delta_ratio']:.3f} | "
            + (
                "n/a | n/a |"
                if math.isnan(r["seconds"])
                else f"{r['seconds']:.0f} s | {r['peak_mb']:.0f} MB (+{r['delta_rss_mb']:.0f}) |"
            )
        )
    return "\n".join(lines)


def write_markdown(args, table: str, notes: list[str], load_before, load_after, minutes) -> None:
    """Replace SECTION in ``args.md`` (or append it), keeping every other section."""
    import platform

    import torch

    path = args.md
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    command = " ".join(["python benchmarks/bench_memory.py", *map(shlex.quote, sys.argv[1:])])
    section = "\n".join(
        [
            SECTION,
            "",
            "Written by `benchmarks/bench_memory.py` (method and caveats in its docstring). The K-FAC "
            "curvature state of LoRA r=8 on `q_proj` and `v_proj` of a LLaMA-2-7B-shaped model, "
            "measured on a model with the real 4096-wide layers but "
            f"{args.layers} of them, on CPU in float32, and extrapolated per layer to "
            f"{args.target_layers} (every layer has the same shapes). Target from issue 6: under "
            f"{args.budget_gib:g} GiB with the log marginal likelihood within 1% of dense.",
            "",
            f"- Command: `{command}`",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; took {minutes:.0f} min",
            f"- Machine: nproc {os.cpu_count()}, Python {platform.python_version()}, torch "
            f"{torch.__version__} ({args.threads} threads); load average (1/5/15 min) before "
            f"{load_before}, after {load_after} (a shared machine: other jobs inflate times)",
            "",
            table,
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    before, _, after = split_section(text, SECTION)
    path.write_text(join_section(before, section, after))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
