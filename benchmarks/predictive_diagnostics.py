"""Where the Laplace predictive's variance comes from, on a finished ``--marglik`` run.

Loads the adapter and the saved posterior of a run of the default config (or ``--config``),
and on its test split prints accuracy / NLL / ECE / Brier of the MAP model and of the Laplace
predictive with the GLM probit link, the GLM Monte-Carlo link (full logit covariance, 2,000
draws) and parameter samples (``pred_type="nn"``), then the GLM logit variance split by groups
of trainable tensors (the K-FAC posterior is block-diagonal over tensors, so the parts add up).

    python scripts/train.py --marglik --output_dir outputs/default-marglik
    python benchmarks/predictive_diagnostics.py outputs/default-marglik
"""

from __future__ import annotations

import argparse
import math

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", help="output_dir of a finished --marglik run")
    p.add_argument("--config", help="the run's --config (default: the embedded default)")
    p.add_argument("--nn-samples", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from hf_marglik.metrics import calibration_metrics
    from hf_marglik.predictive import glm_covariance, glm_jacobians
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.run import load_trained, prepare

    cfg = parse_args(
        ["--marglik", "--disable_tqdm", "true"] + (["--config", args.config] if args.config else [])
    )
    prep = prepare(cfg)
    model, lap = load_trained(cfg, prep, args.output_dir)
    if lap is None:
        raise SystemExit(f"{args.output_dir} holds no saved posterior (a --marglik run?)")
    names = [n for n, q in model.named_parameters() if q.requires_grad]

    def group(name: str) -> str:
        if "lora_A" in name or "lora_B" in name:
            return "LoRA " + ("A" if "lora_A" in name else "B")
        if "classifier" in name or "score" in name:
            return "head " + ("bias" if name.endswith("bias") else "weight")
        return "other"

    groups = sorted({group(n) for n in names})
    loader = DataLoader(prep.encoded["test"], batch_size=32, collate_fn=prep.collator)
    probs = {k: [] for k in ("MAP", "GLM probit", "GLM MC", "nn samples")}
    parts = {k: [] for k in groups}
    ys, variances = [], []
    g = torch.Generator().manual_seed(0)
    for batch in loader:
        ys.append(batch.pop("labels"))
        logits, jac = glm_jacobians(lap, batch)
        n, k = logits.shape
        cov = glm_covariance(lap, jac, n, k).double()
        var = torch.diagonal(cov, dim1=1, dim2=2)
        variances.append(var)
        f = logits.double()
        probs["MAP"].append(torch.softmax(f, -1))
        probs["GLM probit"].append(torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1))
        L = torch.linalg.cholesky(cov + 1e-9 * torch.eye(k, dtype=cov.dtype))
        eps = torch.randn(2000, n, k, 1, generator=g, dtype=cov.dtype)
        probs["GLM MC"].append(torch.softmax(f + (L @ eps).squeeze(-1), -1).mean(0))
        probs["nn samples"].append(
            lap(batch, pred_type="nn", n_samples=args.nn_samples, generator=g).double()
        )
        for label in groups:
            js = [j if group(nm) == label else torch.zeros_like(j) for j, nm in zip(jac, names)]
            parts[label].append(torch.diagonal(glm_covariance(lap, js, n, k), dim1=1, dim2=2))
    y = torch.cat(ys)
    print(
        f"{len(y)} test examples; prior precision range "
        f"{lap.prior_precision.min():.3g}..{lap.prior_precision.max():.3g}, N = {lap.n_data}\n"
    )
    print("| predictive | accuracy | NLL | ECE | Brier |\n|---|---|---|---|---|")
    for name, ps in probs.items():
        m = calibration_metrics(torch.cat(ps), y)
        print(
            f"| {name} | {m['accuracy']:.3f} | {m['nll']:.3f} | {m['ece']:.3f} | {m['brier']:.3f} |"
        )
    v = torch.cat(variances)
    print(f"\nGLM logit variance: median {v.median():.2f}, mean {v.mean():.2f}, max {v.max():.1f}")
    for label, vs in parts.items():
        print(f"- from {label}: mean {torch.cat(vs).mean():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
