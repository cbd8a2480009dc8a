"""A MargLikSFTTrainer run for tests/test_sft.py: prompt-completion data, LoRA through
``peft_config=``, started with plain python (one process) or under torch.distributed.run with
2 CPU processes (gloo). ``python sft_worker.py OUT PER_DEVICE_BATCH`` writes
``OUT/result-<rank>.json``."""

import json
import os
import sys

import torch
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
    try:
        main(sys.argv[1], int(sys.argv[2]))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    # The results are written. Under torch.distributed.run the interpreter's teardown aborted
    # now and then ("terminate called without an active exception", a C++ thread destroyed at
    # exit; about 1 run in 15 on a loaded 2-core machine): end without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
