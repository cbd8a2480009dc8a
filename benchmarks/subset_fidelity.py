"""Curvature subsets (issue 7): how far the prior precision learned from a fit on part of the
training data lies from the one learned from the full fit, uniform against curvature-weighted
subsets (``hf_marglik/subset.py``), at one fixed trained model.

The model is the bench's (``benchmarks/bench.py``: all-MiniLM-L6-v2, LoRA r=8 on query/value,
5-way head, ``--n-train`` BBC News documents x ``--seq-len`` tokens, batches of
``--batch-size``), trained with ``MargLikTrainer``'s defaults (exact GGN, a full fit every
epoch) for ``--epochs`` epochs at ``--lr``. At its final parameters:

- the full fit (exact GGN, K-FAC, all documents) and, per scheme and fraction, ``--reps``
  subset fits (``Laplace.fit`` with ``n_data`` and the Horvitz–Thompson ``example_weights``):
  ``uniform`` draws each document with probability ``f``; ``curvature`` with
  ``π_n ∝ 1 − Σ_c p_c²`` (:func:`hf_marglik.subset.inclusion_probabilities`), here from
  ``p`` at the final parameters (the trainer uses the last training pass's ``p``, at most an
  epoch old, so this is its best case);
- for every fit, the layerwise prior precision is optimised to convergence (Adam on
  ``log δ``, ``--steps`` steps, lr 0.05, from the trained precisions), so that the comparison
  is the estimator's alone, not the hyper-optimiser's schedule;
- per subset fit, the median and the largest relative deviation over the tensors of its
  precisions from the full fit's; the table gives their mean (and range) over the reps.

``python benchmarks/subset_fidelity.py --write-md`` writes the "Curvature subsets" section of
BENCHMARKS.md (one section per ``--lr``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import benchlib

benchlib.offline_environment()
SECTION = "## Curvature subsets (issue 7), learning rate {lr}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=320)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="the bench's batch size")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="the bench's learning rate")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    benchlib.add_markdown_args(p, SECTION.format(lr="<--lr>"))
    return p.parse_args(argv)


def converged_precision(lap, start, steps: int):
    import torch

    log_prec = torch.log(torch.as_tensor(start, dtype=lap.dtype)).clone().requires_grad_(True)
    opt = torch.optim.Adam([log_prec], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-lap.log_marginal_likelihood(prior_precision=log_prec.exp())).backward()
        opt.step()
    return log_prec.detach().exp()


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from hf_marglik import Laplace, MargLikTrainer
    from hf_marglik.subset import draw, inclusion_probabilities, output_curvature

    cfg = dict(n_train=args.n_train, seq_len=args.seq_len, batch_size=args.batch_size)
    cfg.update(epochs=args.epochs, lr=args.lr, seed=args.seed)
    benchlib.setup_process(args.threads)
    t_start, load_before = time.time(), benchlib.load_average()
    data, model = benchlib.minilm_data(cfg), benchlib.minilm_model(cfg)
    with tempfile.TemporaryDirectory() as out:
        trainer = MargLikTrainer(
            model=model, args=benchlib.training_args(cfg, out, True), train_dataset=data
        )
        trainer.train()
    trained = torch.tensor(trainer.hyperparameters()["prior_precision"])
    model.eval()
    N = len(data)

    def loader(idx):
        rows = [data[i] for i in idx]
        bs = cfg["batch_size"]
        return [
            {k: torch.stack([r[k] for r in rows[j : j + bs]]) for k in rows[0]}
            for j in range(0, len(rows), bs)
        ]

    with torch.no_grad():
        trace = torch.cat(
            [
                output_curvature(model(**{k: v for k, v in b.items() if k != "labels"}).logits)
                for b in loader(range(N))
            ]
        ).double()

    def fit(idx, weights=None):
        lap = Laplace(model, "classification", prior_precision=trained)
        table = None if weights is None else dict(zip(idx, weights))
        order = list(idx)
        example_weights = None
        if table is not None:
            batches = loader(order)
            ids = {
                id(b): order[j * cfg["batch_size"] : (j + 1) * cfg["batch_size"]]
                for j, b in enumerate(batches)
            }

            def example_weights(batch):
                return torch.tensor([table[i] for i in ids[id(batch)]], dtype=torch.float64)

            lap.fit(batches, n_data=N, example_weights=example_weights)
        else:
            lap.fit(loader(order))
        return converged_precision(lap, trained, args.steps)

    t0 = time.time()
    full = fit(range(N))
    t_full = time.time() - t0
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for f in args.fractions:
        designs = {
            "uniform": torch.full((N,), f, dtype=torch.float64),
            "curvature": inclusion_probabilities(trace, f * N),
        }
        for name, pi in designs.items():
            med, mx, sizes = [], [], []
            for _ in range(args.reps):
                idx, w = draw(pi, g)
                d = sorted(float(x) for x in (fit(idx, w) / full - 1).abs())
                med.append(statistics.median(d))
                mx.append(d[-1])
                sizes.append(len(idx))
            rows.append((f, name, med, mx, statistics.mean(sizes)))
            print(f"f={f} {name}: median {med} max {mx}", flush=True)

    def cell(xs):
        return f"{statistics.mean(xs):.1%} ({min(xs):.1%}–{max(xs):.1%})"

    s = trace.sort(descending=True).values
    share = [float(s[: max(1, int(q * N))].sum() / s.sum()) for q in (0.1, 0.25)]
    lines = [
        SECTION.format(lr=args.lr),
        "",
        f"- Command: `python benchmarks/subset_fidelity.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; took "
        f"{(time.time() - t_start) / 60:.0f} min; git {benchlib.git_rev()}; load average "
        f"before {load_before}, after {benchlib.load_average()}",
        f"- Model: MiniLM + LoRA, {N} BBC News documents x {cfg['seq_len']} tokens, trained "
        f"{cfg['epochs']} epochs at lr {cfg['lr']} with MargLikTrainer's defaults; full exact-GGN "
        f"fit {t_full:.0f} s (with the precision optimisation).",
        f"- Output curvature `1 − Σ p²` at the final parameters: median "
        f"{float(trace.median()):.3f}, 10% / 90% quantiles {float(trace.quantile(0.1)):.3f} / "
        f"{float(trace.quantile(0.9)):.3f}; the top 10% / 25% of documents hold "
        f"{share[0]:.0%} / {share[1]:.0%} of it.",
        f"- The full fit's converged precisions against those the training learned (3 fits x 10 "
        f"hyper-steps): median deviation {float((full / trained - 1).abs().median()):.0%}, "
        f"largest {float((full / trained - 1).abs().max()):.0%}.",
        f"- Precisions optimised to convergence ({args.steps} Adam steps) for every fit; "
        f"deviation from the full fit's over the {len(full)} tensors; mean (min–max) over "
        f"{args.reps} draws.",
        "",
        "| subset | sampling | mean size | median deviation | largest deviation |",
        "|---|---|---|---|---|",
    ]
    for f, name, med, mx, size in rows:
        lines.append(f"| {f:.0%} | {name} | {size:.0f} | {cell(med)} | {cell(mx)} |")
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write_md:
        benchlib.replace_section(args.md, SECTION.format(lr=args.lr), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
