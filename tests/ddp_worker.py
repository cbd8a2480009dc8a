"""A MargLikTrainer run for tests/test_trainer_distributed.py: started with plain python (one
process) or under torch.distributed.run with 2 CPU processes (gloo). Checkpoints every 3 steps;
``python ddp_worker.py OUT PER_DEVICE_BATCH [CHECKPOINT]`` resumes from CHECKPOINT (written by
a run with any number of processes). ``HF_MARGLIK_TEST_SUBSET=0.5`` in the environment fits the
curvature on a curvature-weighted half of the data (``marglik_subset``);
``HF_MARGLIK_TEST_ONLINE=1`` gathers it online from the training steps;
``HF_MARGLIK_TEST_BACKEND`` sets the curvature's backend (the exact GGN ``"ggn"`` by default;
``"ggn-mc"``: labels sampled per example, the same for any number of processes);
``HF_MARGLIK_TEST_GRIDSEARCH=1``
tunes the predictive's prior on :func:`eval_data` (``predictive_prior="gridsearch"``), which
the Trainer shards across processes, and evaluates on it."""

import json
import os
import sys

import torch
from models import TinyData, TinyNet, run_worker  # tests/ is this script's folder

from hf_marglik import MargLikTrainer, MargLikTrainingArguments


def learnable_data(n: int, seed: int) -> TinyData:
    """``n`` examples whose labels are a linear rule of ``x`` (the model can learn them)."""
    data = TinyData(n)
    g = torch.Generator().manual_seed(seed)
    data.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    rule = torch.tensor([[2.0, -1.0, 0.0], [0.0, 2.0, -1.0], [-1.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    data.y = (data.x @ rule.double()).argmax(-1)
    return data


def eval_data() -> TinyData:
    """16 examples of the training rule; in every second batch of 4 (the second process's
    shard) the labels are moved to the next class. The model is right and confident on the
    first process's shard, confidently wrong on the second's: alone, each shard prefers another
    predictive prior than the whole split does."""
    data = learnable_data(16, 1)
    data.y = torch.where(torch.arange(16) % 8 < 4, data.y, (data.y + 1) % 3)
    return data


def main(out_dir: str, per_device_batch: int, resume: str | None = None) -> None:
    gridsearch = bool(os.environ.get("HF_MARGLIK_TEST_GRIDSEARCH"))
    torch.manual_seed(0)
    model = TinyNet().double()
    args = MargLikTrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        learning_rate=1e-1 if gridsearch else 1e-2,
        num_train_epochs=3,
        save_strategy="steps",
        save_steps=3,
        n_hypersteps=5,
        dict_key_x="x",
        seed=0,
        disable_tqdm=True,
        predictive_prior="gridsearch" if gridsearch else "marglik",
        marglik_subset=float(os.environ.get("HF_MARGLIK_TEST_SUBSET", 0)) or None,
        backend=os.environ.get("HF_MARGLIK_TEST_BACKEND", "ggn"),
        marglik_curvature=(
            "online"
            if os.environ.get("HF_MARGLIK_TEST_ONLINE")
            else None
            if os.environ.get("HF_MARGLIK_TEST_SUBSET")
            else "fit"
        ),
    )
    trainer = MargLikTrainer(
        model=model,
        args=args,
        train_dataset=learnable_data(24, 0) if gridsearch else TinyData(),
        eval_dataset=eval_data() if gridsearch else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate() if gridsearch else {}
    lap = trainer.laplace
    rank = int(os.environ.get("RANK", 0))
    result = {
        "world_size": trainer.args.world_size,
        "fit_count": lap.n_data,
        "scores": len(trainer._curvature_subset.scores) if trainer._curvature_subset else 0,
        "n_data": trainer.n_data,
        "margliks": trainer.margliks,
        "losses": trainer.losses,
        "prior_precision": lap.prior_precision.tolist(),
        "log_marglik": float(lap.log_marginal_likelihood()),
        "curvature": lap.curvature_dense().flatten().tolist(),
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "eval": {k: v for k, v in metrics.items() if k.startswith(("eval_map_", "eval_laplace_"))},
        "predictive_prior_precision": (
            None
            if lap.predictive_prior_precision is None
            else lap.predictive_prior_precision.tolist()
        ),
    }
    with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    run_worker(main, sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
