"""A MargLikSFTTrainer run for tests/test_sft.py: prompt-completion data, LoRA through
``peft_config=``, started with plain python (one process) or under torch.distributed.run with
2 CPU processes (gloo). ``python sft_worker.py OUT PER_DEVICE_BATCH`` writes
``OUT/result-<rank>.json``."""

import json
import os
import sys

import torch
from models import run_worker  # tests/ is this script's folder
from sft_data import byte_tokenizer, dataset, lora_config, sft_args, tiny_llama

from hf_marglik import MargLikSFTTrainer


def main(out_dir: str, per_device_batch: int) -> None:
    torch.set_num_threads(1)
    tokenizer = byte_tokenizer()
    trainer = MargLikSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=sft_args(
            os.path.join(out_dir, "run"),
            per_device_train_batch_size=per_device_batch,
            per_device_eval_batch_size=per_device_batch,
            num_train_epochs=2,
            n_hypersteps=3,
        ),
        train_dataset=dataset("prompt_completion", 16),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    lap = trainer.laplace
    result = {
        "world_size": trainer.args.world_size,
        "n_data": trainer.n_data,
        "margliks": trainer.margliks,
        "losses": trainer.losses,
        "prior_precision": lap.prior_precision.tolist(),
        "log_marglik": float(lap.log_marginal_likelihood()),
        "params": torch.cat([p.detach().flatten() for p in trainer._params]).tolist(),
    }
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    run_worker(main, sys.argv[1], int(sys.argv[2]))
