"""A MargLikTrainer run for tests/test_trainer_distributed.py: started with plain python (one
process) or under torch.distributed.run with 2 CPU processes (gloo). Checkpoints every 3 steps;
``python ddp_worker.py OUT PER_DEVICE_BATCH [CHECKPOINT]`` resumes from CHECKPOINT (written by
a run with any number of processes). ``HF_MARGLIK_TEST_SUBSET=0.5`` in the environment fits the
curvature on a curvature-weighted half of the data (``marglik_subset``);
``HF_MARGLIK_TEST_ONLINE=1`` gathers it online from the training steps (empirical Fisher, so
that the labels are the same for any number of processes)."""

import json
import os
import sys

import torch
from models import TinyData, TinyNet  # tests/ is this script's folder

from hf_marglik import MargLikTrainer, MargLikTrainingArguments


def main(out_dir: str, per_device_batch: int, resume: str | None = None) -> None:
    torch.manual_seed(0)
    model = TinyNet().double()
    args = MargLikTrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        learning_rate=1e-2,
        num_train_epochs=3,
        save_strategy="steps",
        save_steps=3,
        n_hypersteps=5,
        dict_key_x="x",
        seed=0,
        disable_tqdm=True,
        marglik_subset=float(os.environ.get("HF_MARGLIK_TEST_SUBSET", 0)) or None,
        **(
            {"marglik_curvature": "online", "backend": "ef"}
            if os.environ.get("HF_MARGLIK_TEST_ONLINE")
            else {
                "marglik_curvature": None if os.environ.get("HF_MARGLIK_TEST_SUBSET") else "fit",
                "backend": "ggn",
            }
        ),
    )
    trainer = MargLikTrainer(model=model, args=args, train_dataset=TinyData())
    trainer.train(resume_from_checkpoint=resume)
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
    }
    with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
