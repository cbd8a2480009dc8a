"""K-FAC fidelity on small LoRA models: how far is ``log det(f·H + δI)`` of K-FAC-expand and
K-FAC-reduce from the exact GGN ("full")?

For each model (tiny random BERT sequence classification, GPT-2 and LLaMA causal LMs, LoRA on the
attention projections, float64, random data with padding and -100 labels) the script fits
``hf_marglik.Laplace`` with ``hessian_structure="full"`` (exact GGN) and with ``"kron"`` for
``kfac_approx`` in {expand, reduce} and backend in {ggn, ggn-mc}, and prints, per prior
precision δ (``f = 1``):

δ is given relative to the mean exact-GGN diagonal ``h̄ = tr(H_full)/P`` (``--deltas``), so
that rows compare across models whatever their data count:

* ``rel_logdet`` = |ld_K − ld_full| / |ld_full| with ``ld = log det(H + δI)``;
* ``rel_curv`` = |c_K − c_full| / c_full with ``c = log det(I + H/δ)``, the data-dependent part
  (``ld = c + P log δ``), which the prior term does not dilute;
* ``KL`` = KL(N(0, (H_full + δI)⁻¹) ‖ N(0, (H_K + δI)⁻¹)) in nats: how far the K-FAC posterior
  is from the exact-GGN posterior (same mean), free of the cancellations a single log det
  can hide;
* ``trace_ratio`` = tr(H_K) / tr(H_full).

Usage::

    python benchmarks/kfac_fidelity.py            # the table recorded in BENCHMARKS.md
    python benchmarks/kfac_fidelity.py --help
"""

from __future__ import annotations

import argparse
import time

from benchlib import model_builders


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["bert-cls", "gpt2-lm", "llama-lm"])
    p.add_argument(
        "--deltas",
        nargs="+",
        type=float,
        default=[0.1, 1.0, 10.0],
        help="prior precisions δ as multiples of the mean exact-GGN diagonal tr(H)/P",
    )
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--n-batches", type=int, default=4, help="batches for the causal LMs")
    p.add_argument("--cls-batches", type=int, default=16, help="batches for classification")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=12)
    p.add_argument("--mc-samples", type=int, default=1, help="samples for the ggn-mc rows")
    p.add_argument("--train-steps", type=int, default=30, help="Adam steps before fitting")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    return p


def _batches(args, vocab, g, lm: bool, n_labels: int = 5):
    import torch

    out = []
    for i in range(args.n_batches if lm else args.cls_batches):
        ids = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=g)
        mask = torch.ones_like(ids)
        for r in range(0, args.batch_size, 2):  # every other sequence padded to a random length
            n = int(torch.randint(args.seq_len // 2, args.seq_len, (1,), generator=g))
            mask[r, n:] = 0
        ids[mask == 0] = 0
        if lm:
            y = ids.clone()
            y[mask == 0] = -100
            y[1, 3 + i] = -100  # a prompt token that is not a target
        else:
            y = torch.randint(n_labels, (args.batch_size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return out


def build(name: str, args, seed: int):
    """``(model, batches, likelihood)`` for a tiny LoRA model in float64 (``tests/models.py``'s
    builders at these sizes), its LoRA ``B`` drawn N(0, 0.1²), trained ``--train-steps`` steps."""
    import torch

    M = model_builders()
    sizes = dict(
        hidden=args.hidden,
        layers=args.layers,
        heads=4,
        vocab=args.vocab,
        r=args.rank,
        lora_alpha=8,  # peft's default
        dtype=torch.float64,
        seed=seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    if name == "bert-cls":
        model = M.bert_lora_model(num_labels=5, max_positions=512, attn="sdpa", **sizes)
        lik, lm = "classification", False
    elif name == "gpt2-lm":
        model = M.gpt2_lora_model(max_positions=64, attn="sdpa", **sizes)
        lik, lm = "causal_lm", True
    elif name == "llama-lm":
        model = M.llama_lora_model(kv_heads=2, max_positions=64, **sizes)
        lik, lm = "causal_lm", True
    else:
        raise ValueError(f"unknown model {name!r}; choose bert-cls, gpt2-lm or llama-lm")
    # LoRA's B = 0 start would make every lora_A block vanish
    M.randomise_trainable(model, g, 0.1, only="lora_B")
    batches = _batches(args, args.vocab, g, lm)
    if args.train_steps:
        _train(model, batches, lik, args.train_steps)
    return model, batches, lik


def _train(model, batches, lik, steps):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        y = b["labels"]
        if lik == "causal_lm":
            y = y.masked_fill(b["attention_mask"] == 0, -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())
        else:
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for seed in args.seeds:
            rows += fidelity(name, args, seed)
    if len(args.seeds) > 1:
        summary(rows, args)
    return rows


def summary(rows: list[dict], args) -> None:
    """Median over seeds of rel_curv, KL and the trace ratio per model, approx and backend."""
    import statistics

    print(f"\nSummary: median over seeds {args.seeds} of rel_curv | KL at δ/h̄ = {args.deltas}")
    print(
        f"{'model':9} {'backend':10} {'approx':7} "
        + " ".join(f"{r:>8g}" for r in args.deltas)
        + " | "
        + " ".join(f"{r:>8g}" for r in args.deltas)
        + f" {'trace':>7}"
    )
    keys = dict.fromkeys((r["model"], r["backend"], r["approx"]) for r in rows)
    for key in keys:
        sel = [r for r in rows if (r["model"], r["backend"], r["approx"]) == key]
        med = [
            statistics.median(r["rel_curv"] for r in sel if r["delta_rel"] == d)
            for d in args.deltas
        ]
        kl = [statistics.median(r["kl"] for r in sel if r["delta_rel"] == d) for d in args.deltas]
        tr = statistics.median(r["trace_ratio"] for r in sel)
        print(
            f"{key[0]:9} {key[1]:10} {key[2]:7} "
            + " ".join(f"{m:8.4f}" for m in med)
            + " | "
            + " ".join(f"{m:8.2f}" for m in kl)
            + f" {tr:7.3f}"
        )


def fidelity(name: str, args, seed: int) -> list[dict]:
    """The rows for one model and seed (printed as they come)."""
    import torch

    from hf_marglik import Laplace

    model, batches, lik = build(name, args, seed)
    t0 = time.perf_counter()
    full = Laplace(model, lik, hessian_structure="full")
    full.fit(batches)
    H = full.curvature_dense()
    t_full = time.perf_counter() - t0
    P = H.shape[0]
    eye = torch.eye(P, dtype=H.dtype)
    hbar = float(torch.trace(H)) / P
    print(
        f"\n{name} (seed {seed}): likelihood={lik}, P={P} trainable parameters in "
        f"{full.n_layers} tensors, n_data={full.n_data}, mean GGN diagonal {hbar:.3g}, "
        f"full GGN fit {t_full:.1f}s"
    )
    print(
        f"{'approx':8} {'backend':10} {'δ/h̄':>6} {'rel_logdet':>11} {'rel_curv':>9} "
        f"{'KL':>9} {'trace_ratio':>11} {'fit_s':>6}"
    )
    rows = []
    for backend in ("ggn", "ggn-mc"):
        for approx in ("expand", "reduce"):
            mc = {"n_mc_samples": args.mc_samples, "seed": seed} if backend == "ggn-mc" else {}
            t0 = time.perf_counter()
            kron = Laplace(
                model, lik, hessian_structure="kron", kfac_approx=approx, backend=backend, **mc
            )
            kron.fit(batches)
            t_fit = time.perf_counter() - t0
            K = kron.curvature_dense()
            tr = float(torch.trace(K) / torch.trace(H))
            label = backend if backend == "ggn" else f"ggn-mc:{args.mc_samples}"
            for r in args.deltas:
                d = r * hbar
                log_d = P * torch.log(torch.tensor(d, dtype=H.dtype))
                ld_f = torch.linalg.slogdet(H + d * eye)[1]
                ld_k = torch.linalg.slogdet(K + d * eye)[1]
                c_f, c_k = ld_f - log_d, ld_k - log_d
                # KL(N(0, (H+δ)⁻¹) ‖ N(0, (K+δ)⁻¹)): same mean (the MAP), so only covariances
                tr_term = torch.trace(torch.linalg.solve(H + d * eye, K + d * eye))
                kl = 0.5 * (tr_term - P + ld_f - ld_k)
                row = {
                    "model": name,
                    "seed": seed,
                    "approx": approx,
                    "backend": label,
                    "delta_rel": r,
                    "delta": d,
                    "rel_logdet": float((ld_k - ld_f).abs() / ld_f.abs()),
                    "rel_curv": float((c_k - c_f).abs() / c_f.abs()),
                    "trace_ratio": tr,
                    "kl": float(kl),
                }
                rows.append(row)
                print(
                    f"{approx:8} {label:10} {r:6g} {row['rel_logdet']:11.4f} "
                    f"{row['rel_curv']:9.4f} {row['kl']:9.3f} {tr:11.3f} {t_fit:6.1f}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main(make_parser().parse_args())
