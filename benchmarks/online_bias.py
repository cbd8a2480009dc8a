"""Why the online curvature learns stronger priors than an exact pass: its parts, one at a time,
at the same trained parameters (BENCHMARKS.md, "Online curvature: where its prior comes from").

    python benchmarks/online_bias.py [--seed 0] [--out /tmp/online_bias] [--reuse]

Trains the default config with ``--marglik`` (the online default; ``--reuse`` takes an earlier
run from ``--out``), then, at its final parameters, fits the curvature of the training split
four ways and takes each to its own optimum of the layerwise prior precisions (``--n_steps`` Adam
steps of the hyper-optimiser from the same start):

* ``exact``: the exact GGN, a pass in eval mode (dropout off) — the reference;
* ``mc``: one Monte-Carlo label per example, a pass in eval mode: the Monte-Carlo noise;
* ``mc_train_mode``: the same in train mode (dropout on), as the online curvature's forward
  passes run, at fixed parameters: the effect of dropout;
* ``mc_train_mode_third``: the same on every third batch only (the default sampling interval),
  rescaled to N: the subsampling noise.

What remains between the last and the precisions the run itself learned is the window: its
factors mix the parameters of the whole epoch. Prints, per fit, the mean log precision, the
geometric-mean ratio of the precisions to the exact fit's, and the log marginal likelihood at the
fit's own optimum.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fit_online(lap, model, loader, key_x, key_y, every: int, seed: int):
    """The online curvature of ``loader`` in train mode at fixed parameters (no optimizer)."""
    import torch

    from hf_marglik import batches as B
    from hf_marglik.online import OnlineCurvature

    on = OnlineCurvature.for_laplace(lap, 1, seed)
    model.train()
    with torch.enable_grad():
        for i, batch in enumerate(loader):
            if i % every != every - 1:
                continue
            x, y = B.split_batch(batch, key_x, key_y)
            mask = x.get("attention_mask")
            with on.recording(model) as rec:
                logits = B.call_model(model, x, key_x)
                t = B.targets_for(logits, y, lap.likelihood, mask)
                on.add(rec, t, mask, x[key_x], i)
    model.zero_grad(set_to_none=True)
    model.eval()
    return lap.fit_from(on.result(lap_n_data(loader, key_y)))


def lap_n_data(loader, key_y) -> int:
    return sum(int((b[key_y] != -100).sum()) for b in loader)


def optimum(lap, sizes, n_steps: int):
    import torch

    from hf_marglik.hyper import HyperOptimizer

    hyper = HyperOptimizer(sizes, "classification", "layerwise", prior_prec_init=1.0, lr_hyp=0.1)
    hyper.step(lap, n_steps)
    prec = hyper.prior_precision.detach()
    with torch.no_grad():
        lml = float(lap.log_marginal_likelihood(prior_precision=prec))
    return prec.double(), lml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/online_bias")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--n_steps", type=int, default=300)
    args = p.parse_args(argv)
    from torch.utils.data import DataLoader

    from hf_marglik import Laplace
    from hf_marglik.recipe import parse_args, run
    from hf_marglik.recipe.run import load_trained, prepare

    out = Path(args.out) / f"seed{args.seed}"
    flags = ["--config", "configs/default.yaml", "--marglik", "--seed", str(args.seed)]
    flags += ["--disable_tqdm", "true", "--report_to", "none", "--output_dir", str(out)]
    cfg = parse_args(flags)
    if not (args.reuse and (out / "metrics.json").is_file()):
        run(cfg)
    prep = prepare(cfg)
    model, learned = load_trained(cfg, prep, out)
    key_x, key_y = cfg.training.dict_key_x, cfg.training.dict_key_y
    bs = cfg.training.per_device_train_batch_size
    loader = list(DataLoader(prep.encoded["train"], batch_size=bs, collate_fn=prep.collator))
    sizes = [p.numel() for p in learned.params]

    def new(backend):
        return Laplace(model, "classification", backend=backend, seed=args.seed, dict_key_x=key_x)

    fits = {
        "exact": new("ggn").fit(loader),
        "mc": new("ggn-mc").fit(loader),
        "mc_train_mode": fit_online(new("ggn-mc"), model, loader, key_x, key_y, 1, args.seed),
        "mc_train_mode_third": fit_online(new("ggn-mc"), model, loader, key_x, key_y, 3, args.seed),
    }
    learned_prec = learned.prior_precision.double()
    ref, _ = optimum(fits["exact"], sizes, args.n_steps)
    print(f"seed {args.seed}: {len(sizes)} tensors, N = {fits['exact'].n_data}")
    print(f"{'fit':22s} {'mean log δ':>11s} {'δ / exact (geo)':>16s} {'log ML at own δ':>16s}")
    for name, lap in fits.items():
        prec, lml = optimum(lap, sizes, args.n_steps)
        ratio = math.exp(float((prec.log() - ref.log()).mean()))
        print(f"{name:22s} {float(prec.log().mean()):11.3f} {ratio:16.3f} {lml:16.2f}")
    ratio = math.exp(float((learned_prec.log() - ref.log()).mean()))
    print(f"{'learned in training':22s} {float(learned_prec.log().mean()):11.3f} {ratio:16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
