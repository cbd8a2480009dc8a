"""Why does the Laplace GLM predictive of the default ``--marglik`` run lose to its MAP (issue 18)?

Splits the gap with the exact function-space GGN Laplace (:mod:`hf_marglik.function_space`) over
all trainable parameters of a finished run of the default config: K-FAC (expand / reduce, exact
GGN backend, and the run's own Monte-Carlo K-FAC posterior) against the exact GGN, each at the
precisions training learned, at the precisions that maximise its own evidence (layerwise and
scalar); the evidence (zero-mean prior vs a prior centred at the initialisation θ₀, which is
regenerated exactly from the run's seed; the LoRA A·B balance; the linearised model's own mode,
Antorán et al. 2022); the predictive (probit vs Monte-Carlo link, head-only posterior).

    python scripts/train.py --marglik --output_dir /tmp/gap_seed2 --seed 2
    python benchmarks/posterior_gap.py /tmp/gap_seed2 --seed 2 --json /tmp/gap_seed2/gap.json
    python benchmarks/posterior_gap.py --summarise /tmp/gap_seed*/gap.json --write-md

Each run: about 5 minutes on the idle 2-core CPU, 40 when the machine is shared (three K-FAC /
Jacobian passes over the training data, one Jacobian pass over validation and test, the
evidence optimisations); about 4 GB of memory. ``--cache DIR`` keeps the kernels and K-FAC fits
(about 2 GB) so that a rerun skips the passes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Posterior gap (exact function-space reference)"
MC_SAMPLES = 1000
EM_STEPS = 60
SCALES = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def group_of(name: str) -> str:
    if "lora_A" in name:
        return "LoRA A"
    if "lora_B" in name:
        return "LoRA B"
    return "head bias" if name.endswith("bias") else "head weight"


def geo_means(prec, names, cap: float = 1e8) -> dict[str, float | None]:
    """Geometric mean of a layerwise (or scalar) precision per tensor group over the tensors
    below ``cap`` (None when every tensor of the group is switched off), and ``"<group> off"``:
    how many are at the cap."""
    import torch

    p = torch.as_tensor(prec, dtype=torch.float64).reshape(-1)
    if p.numel() == 1:
        p = p.expand(len(names))
    logs: dict[str, list[float]] = {}
    off: dict[str, int] = {}
    for n, v in zip(names, p.tolist()):
        g = group_of(n)
        logs.setdefault(g, [])
        off[g] = off.get(g, 0) + (v >= cap)
        if v < cap:
            logs[g].append(math.log(v))
    out: dict[str, float | None] = {}
    for g, v in sorted(logs.items()):
        out[g] = math.exp(sum(v) / len(v)) if v else None
        out[f"{g} off"] = off[g]
    return out


# ----------------------------------------------------------------------------- measuring
def measure(
    run_dir: str, seed: int, threads: int, cache: Path | None, train_args: tuple[str, ...] = ()
) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import torch
    from torch.utils.data import DataLoader
    from transformers import set_seed

    from hf_marglik import Laplace
    from hf_marglik.function_space import (
        FunctionSpaceLaplace,
        _root_apply,
        maximise_evidence,
    )
    from hf_marglik.metrics import calibration_metrics
    from hf_marglik.predictive import categorical, glm_covariance
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.models import build_model
    from hf_marglik.recipe.run import load_trained, prepare

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    t_start = time.time()
    cfg = parse_args(
        [*train_args, "--marglik", "--seed", str(seed), "--output_dir", run_dir]
        + ["--disable_tqdm", "true"]
    )
    prep = prepare(cfg)
    model, lap_run = load_trained(cfg, prep, run_dir)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for n, p in model.named_parameters() if p.requires_grad]

    # θ₀: the run's initialisation, rebuilt exactly as scripts/train.py does (same seed first)
    set_seed(cfg.training.seed)
    init = build_model(cfg.model, cfg.lora, prep.source, prep.num_labels, prep.class_ids)
    init_named = [(n, p) for n, p in init.named_parameters() if p.requires_grad]
    if [n for n, _ in init_named] != names:
        raise SystemExit("the rebuilt initial model has other trainable tensors than the run")
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in init_named]).double()
    del init, init_named

    def loader(split, bs):
        return DataLoader(prep.encoded[split], batch_size=bs, collate_fn=prep.collator)

    train = list(loader("train", 16))
    evals = {s: list(loader(s, 32)) for s in ("validation", "test")}
    labels = {s: torch.cat([b["labels"] for b in bs]) for s, bs in evals.items()}
    learned = lap_run.prior_precision.detach().double().clone()
    res: dict = {"seed": seed, "run_dir": run_dir, "names": names, "sizes": sizes}
    res["load_average_start"] = os.getloadavg()[0]
    res["n_train"] = sum(int((b["labels"] != -100).sum()) for b in train)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    chunks = list(torch.split(theta.double(), sizes))
    chunks0 = list(torch.split(theta0, sizes))
    res["theta0_check"] = {
        "lora_B_init_zero": all(
            float(c.abs().max()) == 0.0 for c, n in zip(chunks0, names) if "lora_B" in n
        ),
        # cosine between trained and initial LoRA A: near 1 if A kept its initial direction
        "cos_A_init": [
            float(torch.nn.functional.cosine_similarity(a, a0, dim=0))
            for a, a0, n in zip(chunks, chunks0, names)
            if "lora_A" in n
        ],
        "norm2": [float((c * c).sum()) for c in chunks],
        "norm2_init": [float((c0 * c0).sum()) for c0 in chunks0],
        "norm2_from_init": [float(((c - c0) ** 2).sum()) for c, c0 in zip(chunks, chunks0)],
    }

    # ---- expensive part, cached: the exact reference (kernels, test kernels), K-FAC fits
    state_file = None if cache is None else cache / "function_space.pt"
    fs = FunctionSpaceLaplace(model, "classification", prior_precision=learned)
    lap_run.predictive_subset_of_weights = "all"  # every row predicts over all tensors
    laps = {"K-FAC expand, MC GGN (the run's)": lap_run}
    approxes = ("expand", "reduce")
    if state_file is not None and state_file.exists():
        saved = torch.load(state_file, weights_only=False)
        fs.__dict__.update(saved["fs"])
        tk = saved["tk"]
        res.update(saved["timing"])
        for approx in approxes:
            laps[f"K-FAC {approx}"] = Laplace.from_pretrained(cache / f"kfac_{approx}", model)
        print(f"[{time.time() - t_start:.0f}s] loaded {state_file}", flush=True)
    else:
        timing = {}
        t0 = time.time()
        fs.fit(train)
        timing["time_fs_fit_s"] = time.time() - t0
        timing["fs_bytes_jacobian"] = sum(J.numel() * J.element_size() for J in fs._J)
        timing["fs_bytes_kernels"] = fs._K.numel() * fs._K.element_size()
        t0 = time.time()
        tk = {s: [fs.test_kernels(b, keep_jacobians=True) for b in bs] for s, bs in evals.items()}
        timing["time_test_kernels_s"] = time.time() - t0
        timing["rss_after_fs_gb"] = _rss_gb()
        print(f"[{time.time() - t_start:.0f}s] function-space reference ready", flush=True)
        for approx in approxes:
            t0 = time.time()
            laps[f"K-FAC {approx}"] = Laplace(
                model,
                "classification",
                hessian_structure="kron",
                backend="ggn",
                kfac_approx=approx,
                prior_precision=learned,
            ).fit(train)
            timing[f"time_kfac_{approx}_fit_s"] = time.time() - t0
        print(f"[{time.time() - t_start:.0f}s] K-FAC fits done", flush=True)
        res.update(timing)
        if state_file is not None:
            cache.mkdir(parents=True, exist_ok=True)
            keep = {k: v for k, v in fs.__dict__.items() if k not in ("model", "_lap", "_params")}
            torch.save({"fs": keep, "tk": tk, "timing": timing}, state_file)
            for approx in approxes:
                laps[f"K-FAC {approx}"].save_pretrained(cache / f"kfac_{approx}")
    for lap in laps.values():
        lap.prior_precision = learned.to(lap.prior_precision.dtype)
    # one evidence evaluation (forward; forward + backward) at N·C outputs
    d = learned.clone().requires_grad_(True)
    t0 = time.time()
    for _ in range(3):
        fs.log_marginal_likelihood(d)
    res["time_evidence_s"] = (time.time() - t0) / 3
    t0 = time.time()
    for _ in range(3):
        fs.log_marginal_likelihood(d).backward()
    res["time_evidence_grad_s"] = (time.time() - t0) / 3

    rows: list[dict] = []

    def metrics_of(probs_by_split):
        return {s: calibration_metrics(torch.cat(p), labels[s]) for s, p in probs_by_split.items()}

    def exact_evidence(prec, obj=fs):
        return float(obj.log_marginal_likelihood(torch.as_tensor(prec, dtype=torch.float64)))

    def add(label, probs, prec=None, own=None, exact=None, **extra):
        row = {"label": label, "metrics": metrics_of(probs), "own_lml": own, "exact_lml": exact}
        if prec is not None:
            row["prec_groups"] = geo_means(prec, names)
        row.update(extra)
        rows.append(row)
        m = row["metrics"]
        print(
            f"  {label:60s} val NLL {m['validation']['nll']:.3f} ECE "
            f"{m['validation']['ece']:.3f} | test NLL {m['test']['nll']:.3f} ECE "
            f"{m['test']['ece']:.3f} acc {m['test']['accuracy']:.3f} | own "
            f"{own if own is None else round(own, 2)} exact {exact if exact is None else round(exact, 2)}",
            flush=True,
        )

    add("MAP", {s: [torch.softmax(k.logits, -1) for k in tk[s]] for s in tk})

    def kfac_probs(lap, prec):
        lap.prior_precision = prec.to(lap.prior_precision.dtype)
        out = {}
        for s, kernels in tk.items():
            out[s] = []
            for k in kernels:
                n, c = k.logits.shape
                cov = glm_covariance(lap, [J.to(lap.dtype) for J in k.jacobians], n, c).double()
                out[s].append(categorical(k.logits, cov, "probit", 1, None))
        return out

    def fs_probs(obj, prec, link="probit", mode=None, kernels=None):
        g = torch.Generator().manual_seed(0)
        kernels = tk if kernels is None else kernels
        return {
            s: [
                obj.predict(k, link, MC_SAMPLES, g, prior_precision=prec, mode=mode)
                for k in kernels[s]
            ]
            for s in kernels
        }

    def kfac_lml(lap, prec):
        return float(
            lap.log_marginal_likelihood(prior_precision=prec.to(lap.prior_precision.dtype))
        )

    # (a) learned precisions
    for name, lap in laps.items():
        add(
            f"{name}, learned δ",
            kfac_probs(lap, learned),
            learned,
            kfac_lml(lap, learned),
            exact_evidence(learned),
        )
    add(
        "exact GGN, learned δ",
        fs_probs(fs, learned),
        learned,
        exact_evidence(learned),
        exact_evidence(learned),
    )
    # (b) own-evidence-optimal layerwise, (c) scalar
    optima: dict[str, dict] = {}
    for structure in ("layerwise", "scalar"):
        start = learned if structure == "layerwise" else learned.log().mean().exp().reshape(1)
        for name, lap in laps.items():
            t0 = time.time()

            def ev(p, lap=lap):
                return lap.log_marginal_likelihood(prior_precision=p.to(lap.prior_precision.dtype))

            best = maximise_evidence(ev, start, tol=1e-7)
            optima.setdefault(name, {})[structure] = best
            add(
                f"{name}, own-optimal {structure} δ",
                kfac_probs(lap, best),
                best,
                kfac_lml(lap, best),
                exact_evidence(best),
                opt_time_s=time.time() - t0,
            )
        t0 = time.time()
        best = fs.optimize_prior_precision(structure, init=start)
        optima.setdefault("exact GGN", {})[structure] = best
        add(
            f"exact GGN, own-optimal {structure} δ",
            fs_probs(fs, best),
            best,
            exact_evidence(best),
            exact_evidence(best),
            opt_time_s=time.time() - t0,
        )
    print(f"[{time.time() - t_start:.0f}s] optima done", flush=True)
    fs_opt = optima["exact GGN"]["layerwise"]

    # the evidence: prior centred at θ₀
    fs0 = fs.with_prior_mean(theta0)
    for structure in ("layerwise", "scalar"):
        start = fs_opt if structure == "layerwise" else fs_opt.log().mean().exp().reshape(1)
        best = fs0.optimize_prior_precision(structure, init=start)
        optima.setdefault("exact GGN, prior at θ₀", {})[structure] = best
        add(
            f"exact GGN, prior at θ₀, own-optimal {structure} δ",
            fs_probs(fs0, best),
            best,
            exact_evidence(best, fs0),
            exact_evidence(best),
        )

    # the linearisation point: the linearised model's own mode and evidence (EM / MacKay)
    for tag, obj in (("zero-mean", fs),):  # θ₀-centred: see the θ₀ rows (a worse evidence)
        t0 = time.time()

        changes: list[float] = []

        def progress(it, prec, change, changes=changes):
            changes.append(change)
            if it % 10 == 0:
                print(f"    EM step {it}: max relative change {change:.2e}", flush=True)

        start = fs_opt if tag == "zero-mean" else optima["exact GGN, prior at θ₀"]["layerwise"]
        prec, mode, iters = obj.optimize_linearised(
            init=start, max_iter=EM_STEPS, rtol=1e-3, callback=progress
        )
        res[f"linearised_{tag}_last_change"] = changes[-1]
        res[f"linearised_{tag}_switched_off"] = [
            n for n, v in zip(names, prec.tolist()) if v >= 1e8
        ]
        lml = float(obj.linearised_log_marginal_likelihood(mode))
        kernels = tk if obj is fs else {s: [obj.rebase(k) for k in v] for s, v in tk.items()}
        add(
            f"linearised-mode evidence ({tag}) δ, GLM at θ*",
            fs_probs(obj, prec),
            prec,
            lml,
            exact_evidence(prec, obj),
            em_iters=iters,
            em_time_s=time.time() - t0,
        )
        add(
            f"linearised-mode evidence ({tag}) δ, linear model's posterior",
            fs_probs(obj, prec, mode=mode, kernels=kernels),
            prec,
            lml,
            exact_evidence(prec, obj),
        )
        optima.setdefault(f"linearised ({tag})", {})["layerwise"] = prec
        res[f"linearised_{tag}_mode"] = {
            "train_loss_lin": float(obj._nll(mode.outputs).sum()),
            "train_loss_map": float(obj.loss),
            "newton_iters": mode.n_iter,
            "scatter": obj.linearised_scatter(mode).tolist(),
        }

    # the predictive: MC link, head-only posterior, scaled precisions
    add("exact GGN, learned δ, MC link", fs_probs(fs, learned, "mc"), learned)
    add("exact GGN, own-optimal layerwise δ, MC link", fs_probs(fs, fs_opt, "mc"), fs_opt)
    head_names = [n for n in names if group_of(n).startswith("head")]
    head = fs.subset(head_names) if head_names else None  # an answer-token model has no head
    idx = [names.index(n) for n in head_names]
    if head is not None:
        _head_rows(add, fs_probs, exact_evidence, head, learned[idx], optima)
    # how strong must the prior be for the predictive? δ × k, k chosen on validation NLL
    for base_label, base in (("learned", learned), ("own-optimal layerwise", fs_opt)):
        val = {}
        for k in SCALES:
            probs = fs_probs(fs, base * k, kernels={"validation": tk["validation"]})
            val[k] = calibration_metrics(torch.cat(probs["validation"]), labels["validation"])
        best_k = min(val, key=lambda k: val[k]["nll"])
        res[f"scale_grid_{base_label}"] = {str(k): m["nll"] for k, m in val.items()}
        add(
            f"exact GGN, {base_label} δ × k (k best on validation NLL)",
            fs_probs(fs, base * best_k),
            base * best_k,
            exact_evidence(base * best_k),
            exact_evidence(base * best_k),
            scale=best_k,
        )

    # where the predictive variance comes from: prior vs posterior logit variance
    def mean_var(obj, prec, kernels):
        post, prior = [], []
        for k in kernels:
            _, cov = obj.functional_covariance(k, prec)
            post.append(torch.diagonal(cov, dim1=1, dim2=2).mean())
            w = 1.0 / obj._layer_prec(prec)
            prior.append(torch.einsum("l,lmcc->", w, k.blocks) / k.logits.numel())
        return float(torch.stack(post).mean()), float(torch.stack(prior).mean())

    res["logit_variance"] = {}
    for key, prec in (("learned", learned), ("exact-optimal", fs_opt)):
        post, prior = mean_var(fs, prec, tk["test"])
        # on the training articles: K** are the diagonal blocks of the train kernels
        Ktrain = fs.kernel(prec)
        prior_tr = float(torch.diagonal(Ktrain).mean())
        _, _, C = fs._system(prec, fs.sigma_noise, fs.root)
        V = torch.linalg.solve_triangular(C, _root_apply(fs.root, Ktrain), upper=False)
        post_tr = float((torch.diagonal(Ktrain) - (V * V).sum(0)).mean())
        del V
        res["logit_variance"][key] = {
            "test_posterior": post,
            "test_prior": prior,
            "train_posterior": post_tr,
            "train_prior": prior_tr,
        }

    # diagnostics: γ, scatter, balance of LoRA pairs, prior function-space variance per group
    diag = {}
    for key, obj, prec in (
        ("learned", fs, learned),
        ("exact-optimal", fs, fs_opt),
        ("θ₀-optimal", fs0, optima["exact GGN, prior at θ₀"]["layerwise"]),
    ):
        gamma = obj.effective_parameters(prec)
        sq = obj.scatter_per_tensor()
        diag[key] = {
            "prec": prec.tolist(),
            "gamma": gamma.tolist(),
            "scatter": sq.tolist(),
            "prior_trace": (torch.einsum("lii->l", fs._K) / prec).tolist(),
        }
    res["diagnostics"] = diag
    res["kfac_optima"] = {k: {s: v.tolist() for s, v in d.items()} for k, d in optima.items()}
    res["rows"] = rows
    res["rss_peak_gb"] = _rss_gb()
    res["load_average_end"] = os.getloadavg()[0]
    res["total_time_s"] = time.time() - t_start
    return res


# ----------------------------------------------------------------------------- reporting


def _head_rows(add, fs_probs, exact_evidence, head, learned_head, optima) -> None:
    """The head-only exact posterior's rows: at the learned head δ and its own optima."""
    add(
        "head only (exact), learned head δ",
        fs_probs(head, learned_head),
        None,
        exact_evidence(learned_head, head),
    )
    for structure in ("layerwise", "scalar"):
        best = head.optimize_prior_precision(structure, init=learned_head)
        optima.setdefault("head only", {})[structure] = best
        add(
            f"head only (exact), own-optimal {structure} δ",
            fs_probs(head, best),
            None,
            exact_evidence(best, head),
            head_prec=best.tolist(),
        )


def _pairs(names: list[str]) -> list[tuple[int, int]]:
    out = []
    for i, n in enumerate(names):
        if "lora_A" in n:
            j = names.index(n.replace("lora_A", "lora_B"))
            out.append((i, j))
    return out


def _median(xs):
    return statistics.median(xs)


def _num(v: float, digits: int) -> str:
    return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def _fmt(values: list[float], digits: int = 3) -> str:
    """One value, or mean ± std over seeds."""
    if len(values) == 1:
        return _num(values[0], digits)
    return f"{_num(statistics.mean(values), digits)} ± {_num(statistics.stdev(values), digits)}"


def summarise(results: list[dict]) -> str:
    seeds = [r["seed"] for r in results]
    for r in results:  # older files name the chosen scale in the label
        for row in r["rows"]:
            row["label"] = re.sub(r"× [0-9.]+ \(k best", "× k (k best", row["label"])
    labels = [row["label"] for row in results[0]["rows"]]
    lines = [
        "| posterior, prior precision δ | val NLL | val ECE | test NLL | test ECE | test acc | "
        "log evidence (own) | exact log evidence at δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(labels):
        rs = [r["rows"][i] for r in results]
        assert all(x["label"] == label for x in rs)

        def col(split, key, rs=rs):
            return _fmt([x["metrics"][split][key] for x in rs])

        def ev(key, rs=rs):
            vals = [x[key] for x in rs if x.get(key) is not None]
            if len(vals) < len(rs):
                return "–"
            return "< −10⁶" if max(vals) < -1e6 else _fmt(vals, 1)

        if "scale" in rs[0]:
            ks = ", ".join(f"{x['scale']:g}" for x in rs)
            label = label.replace("k best", f"k = {ks} best")
        lines.append(
            f"| {label} | {col('validation', 'nll')} | {col('validation', 'ece')} | "
            f"{col('test', 'nll')} | {col('test', 'ece')} | {col('test', 'accuracy')} | "
            f"{ev('own_lml')} | {ev('exact_lml')} |"
        )
    # precision groups
    glines = [
        "| δ (geometric mean per group) | LoRA A | LoRA B | head weight | head bias |",
        "|---|---|---|---|---|",
    ]
    for i, label in enumerate(labels):
        rs = [r["rows"][i] for r in results]
        keep = "prec_groups" in rs[0] and "scalar" not in label and "MC link" not in label
        keep = keep and "linear model's posterior" not in label
        keep = keep and ("learned δ" not in label or label == "exact GGN, learned δ")
        if not keep:
            continue
        cells = []
        for g in ("LoRA A", "LoRA B", "head weight", "head bias"):
            vals = [x["prec_groups"][g] for x in rs]
            off = [x["prec_groups"][f"{g} off"] for x in rs]
            n_group = sum(group_of(n) == g for n in results[0]["names"])
            if any(v is None for v in vals):
                cell = f"off ({'/'.join(str(o) for o in off)} of {n_group})"
            else:
                cell = _fmt(vals, 2)
                if any(off):
                    cell += f" ({'/'.join(str(o) for o in off)} of {n_group} off)"
            cells.append(cell)
        name = label.replace(", GLM at θ*", "").replace("learned δ", "learned δ (the run's)")
        glines.append(f"| {name} | " + " | ".join(cells) + " |")
    # LoRA balance and γ
    blines = [
        "| at | δ_A/δ_B (median over 12 LoRA pairs) | δ_A‖A‖² / δ_B‖B‖² | γ_A | γ_B | "
        "γ head | γ total / P |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("learned", "exact-optimal", "θ₀-optimal"):
        ratio, balance, ga, gb, gh, gt = [], [], [], [], [], []
        for r in results:
            d = r["diagnostics"][key]
            pairs = _pairs(r["names"])
            ratio.append(_median([d["prec"][i] / d["prec"][j] for i, j in pairs]))
            balance.append(
                _median(
                    [
                        d["prec"][i] * d["scatter"][i] / (d["prec"][j] * d["scatter"][j])
                        for i, j in pairs
                    ]
                )
            )
            ga.append(sum(d["gamma"][i] for i, _ in pairs))
            gb.append(sum(d["gamma"][j] for _, j in pairs))
            heads = [k for k, n in enumerate(r["names"]) if group_of(n).startswith("head")]
            gh.append(sum(d["gamma"][k] for k in heads))
            gt.append(sum(d["gamma"]) / sum(r["sizes"]))
        blines.append(
            f"| {key} δ | {_fmt(ratio, 2)} | {_fmt(balance, 2)} | {_fmt(ga, 1)} | "
            f"{_fmt(gb, 1)} | {_fmt(gh, 1)} | {_fmt(gt, 4)} |"
        )
    r0 = results[0]

    def span(key, digits=0):
        vals = sorted(r[key] for r in results)
        lo, hi = _num(vals[0], digits), _num(vals[-1], digits)
        return lo if lo == hi else f"{lo}–{hi}"

    timing = (
        f"Exact reference at N·C = {r0['n_train']}·5 = {r0['n_train'] * 5} outputs, "
        f"P = {sum(r0['sizes']):,} (range over the runs, machine load average "
        f"{span('load_average_start', 1)} on 2 cores: the low end is the near-idle machine): "
        f"Jacobians and the 26 kernels {span('time_fs_fit_s')} s, against "
        f"{span('time_kfac_expand_fit_s')} s for one exact-GGN K-FAC fit; one evidence "
        f"evaluation {span('time_evidence_s', 2)} s, with its gradient "
        f"{span('time_evidence_grad_s', 2)} s; train Jacobian "
        f"{r0['fs_bytes_jacobian'] / 2**20:.0f} MiB (float32), kernels "
        f"{r0['fs_bytes_kernels'] / 2**20:.0f} MiB (float64); peak RSS of the whole benchmark "
        f"(model, reference, validation/test kernels and Jacobians, two K-FAC posteriors) "
        f"{span('rss_peak_gb', 1)} GB."
    )

    def facts_of(r):
        t = r["theta0_check"]
        a = [i for i, n in enumerate(r["names"]) if "lora_A" in n]
        lv = r["logit_variance"]
        return {
            "cos": _median(t["cos_A_init"]),
            "a_init": statistics.mean(t["norm2_init"][i] for i in a),
            "a_now": statistics.mean(t["norm2"][i] for i in a),
            "off": len(r.get("linearised_zero-mean_switched_off", [])),
            "test_post": lv["exact-optimal"]["test_posterior"],
            "test_prior": lv["exact-optimal"]["test_prior"],
            "train_post": lv["exact-optimal"]["train_posterior"],
            "train_prior": lv["exact-optimal"]["train_prior"],
            "em_change": r.get("linearised_zero-mean_last_change", float("nan")),
        }

    fx = [facts_of(r) for r in results]

    def f(key, d=2):
        return _fmt([x[key] for x in fx], d)

    facts = (
        f"The initialisation θ₀ (regenerated: `set_seed(seed)` and the recipe's `build_model`, "
        f"as `scripts/train.py` does; LoRA B is 0 there): the trained LoRA A tensors have "
        f"forgotten it, median cosine(A*, A₀) {f('cos')}, mean ‖A‖² {f('a_now')} against "
        f"‖A₀‖² {f('a_init')}, so ‖θ*−θ₀‖² > ‖θ*‖². Linearised-mode evidence (MacKay fixed "
        f"point, {EM_STEPS} steps at most, last relative change {f('em_change')}): "
        f"{f('off', 1)} of 26 tensors switched off (δ → cap 1e8). Mean logit variance at the "
        f"exact evidence optimum: test {f('test_post')} (prior {f('test_prior')}), training "
        f"articles {f('train_post')} (prior {f('train_prior')})."
    )
    return "\n".join(lines), "\n".join(glines), "\n".join(blines), timing + "\n\n" + facts, seeds


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def write_section(md: Path, body: str) -> None:
    """Replace (or append) the ``## SECTION`` of ``md``, keeping every other section."""
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    head = f"## {SECTION}"
    pattern = re.compile(rf"^{re.escape(head)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{head}\n\n{body.rstrip()}\n\n"
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + block)
    )
    md.write_text(text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="output_dir of a finished default --marglik run")
    p.add_argument("--seed", type=int, default=0, help="the run's --seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--train_args",
        default="",
        help="the run's other train.py flags, e.g. '--config configs/smollm2_answer_token.yaml "
        "--max_train_samples 96' (default: the default config's run)",
    )
    p.add_argument("--json", type=Path, help="write the measurements here")
    p.add_argument(
        "--cache",
        type=Path,
        help="folder to keep the kernels and K-FAC fits in (about 2 GB); reused when present",
    )
    p.add_argument("--summarise", nargs="+", type=Path, help="JSON files of measured runs")
    p.add_argument("--write-md", action="store_true", help=f"write the '{SECTION}' section")
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--notes", type=Path, help="Markdown paragraph(s) appended to the section")
    p.add_argument(
        "--revision", help="the code version to report (default: this checkout's git revision)"
    )
    args = p.parse_args(argv)
    if args.summarise:
        results = [json.loads(f.read_text()) for f in args.summarise]
    else:
        if not args.run_dir:
            p.error("give a run_dir or --summarise")
        extra = tuple(args.train_args.split())
        results = [measure(args.run_dir, args.seed, args.threads, args.cache, extra)]
        if args.json:
            args.json.write_text(json.dumps(results[0]))
    table, groups, balance, timing, seeds = summarise(results)
    seeds_txt = ", ".join(str(s) for s in seeds)
    body = (
        f"Commands (repository root, venv active, `HF_HUB_OFFLINE=1`; {datetime.now():%Y-%m-%d}, "
        f"shared 2-core CPU, 2 torch threads, code {args.revision or 'git ' + _git_rev()}):\n\n```\n"
        "python scripts/train.py --marglik --output_dir /tmp/gap_seed$S --seed $S\n"
        "python benchmarks/posterior_gap.py /tmp/gap_seed$S --seed $S --json /tmp/gap_seed$S/gap.json\n"
        "python benchmarks/posterior_gap.py --summarise /tmp/gap_seed*/gap.json --write-md "
        "[--notes READING.md] [--revision TEXT]\n```\n\n"
        f"Default `--marglik` run (all-MiniLM-L6-v2, LoRA r=8 on query/value + 5-way head, "
        f"75,653 trainable parameters in 26 tensors, 320 BBC training articles, MC-GGN K-FAC "
        f"expand, layerwise prior learned by the marginal likelihood); seed(s) {seeds_txt}"
        f"{' (one seed: a diagnostic, not a spread)' if len(seeds) == 1 else ' (mean ± std)'}. "
        "Validation 80, test 200 articles. Every posterior is evaluated at the final parameters "
        'θ* with the GLM probit predictive unless the row says otherwise; "own-optimal" '
        "maximises that posterior's own Laplace evidence at θ* (L-BFGS in log δ, to "
        'convergence). "exact log evidence at δ" is the function-space GGN evidence at '
        "the row's δ (zero-mean prior; for θ₀ rows the θ₀-centred one; for head-only rows the "
        "head-only model's).\n\n"
        f"{table}\n\n{groups}\n\n{balance}\n\n{timing}\n"
    )
    if args.notes:
        body += "\n" + args.notes.read_text()
    print(body)
    if args.write_md:
        write_section(args.md, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
