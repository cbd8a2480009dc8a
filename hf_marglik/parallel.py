"""Which parallel set-ups :class:`~hf_marglik.MargLikTrainer` supports, and a clear refusal of
the others before any work is done.

Supported (tested): one process, and data-parallel (DDP) over several processes started by
``torchrun`` or ``accelerate launch``, where every process holds the whole model: each process
fits the curvature on its shard of the data and the factors, the loss and the data count are
summed over processes (tests/test_distributed.py, tests/test_trainer_distributed.py). Mixed
precision (bf16/fp16), gradient checkpointing and ``factor_rank`` combine with both.

Refused: set-ups that shard the parameters or split the computation of a layer over processes:
FSDP, DeepSpeed (any ZeRO stage), Megatron-LM, and accelerate's ``ParallelismConfig`` with
sharded data parallelism, tensor, context or sequence parallelism. Under these the trainable
tensors a process sees are shards (or, with transformers 5.24 and accelerate 1.15 on CPU,
``fsdp=True`` is silently run as plain DDP), and none of them is tested here. A request is
detected from the training arguments (``fsdp``, ``fsdp_config``, ``deepspeed``,
``parallelism_config``) and from the environment variables that ``accelerate launch`` sets
(``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_MEGATRON_LM``,
``ACCELERATE_USE_PARALLELISM_CONFIG`` with ``PARALLELISM_CONFIG_*_SIZE``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

SUPPORTED = (
    "one process (CPU or one GPU), or data-parallel DDP over several processes (torchrun or "
    "accelerate launch without --use_fsdp / --use_deepspeed), each with bf16/fp16, gradient "
    "checkpointing and factor_rank"
)
_SHARDED_SIZES = ("dp_shard", "tp", "cp", "sp")


def _flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "false").strip().lower() in ("1", "true", "yes", "on", "y", "t")


def _size(value) -> int:
    try:
        return int(value or 1)
    except (TypeError, ValueError):
        return 1


def requested_sharding(args=None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The unsupported parallel set-ups that ``args`` (``TrainingArguments``) or the environment
    of an ``accelerate launch`` ask for, each as ``"<set-up> (<where it was asked for>)"``;
    empty when there are none."""
    env = os.environ if environ is None else environ
    found = []
    if args is not None:
        if getattr(args, "fsdp", None) or getattr(args, "fsdp_plugin_args", None) is not None:
            found.append("FSDP (TrainingArguments fsdp / fsdp_config)")
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            found.append("DeepSpeed (TrainingArguments deepspeed)")
        pc = getattr(args, "parallelism_config", None)
        if pc is not None:
            big = [f"{k}_size={_size(getattr(pc, f'{k}_size', 1))}" for k in _SHARDED_SIZES]
            big = [b for b in big if not b.endswith("=1")]
            if big:
                found.append(f"ParallelismConfig with {', '.join(big)} (TrainingArguments)")
    if _flag(env, "ACCELERATE_USE_FSDP"):
        found.append("FSDP (ACCELERATE_USE_FSDP, accelerate launch --use_fsdp)")
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        found.append("DeepSpeed (ACCELERATE_USE_DEEPSPEED, accelerate launch --use_deepspeed)")
    if _flag(env, "ACCELERATE_USE_MEGATRON_LM"):
        found.append("Megatron-LM (ACCELERATE_USE_MEGATRON_LM)")
    if _flag(env, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        big = [
            f"{k}_size={_size(env.get(f'PARALLELISM_CONFIG_{k.upper()}_SIZE'))}"
            for k in _SHARDED_SIZES
        ]
        big = [b for b in big if not b.endswith("=1")]
        if big:
            found.append(f"ParallelismConfig with {', '.join(big)} (accelerate launch)")
    return list(dict.fromkeys(found))


def check_parallelism(args=None, environ: Mapping[str, str] | None = None) -> None:
    """Raise a ``ValueError`` naming the supported set-ups and the fix when ``args`` or the
    environment ask for a sharded one (:func:`requested_sharding`)."""
    found = requested_sharding(args, environ)
    if found:
        raise ValueError(
            f"MargLikTrainer does not support {'; '.join(found)}. Supported: {SUPPORTED}. "
            "LoRA adapters are small, so plain data parallelism fits them: drop fsdp / "
            "fsdp_config / deepspeed / parallelism_config from the training arguments and launch "
            "with `torchrun --nproc_per_node=N train.py` or `accelerate launch --multi_gpu "
            "train.py` (an accelerate config without FSDP or DeepSpeed)."
        )


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed elementwise over the processes of an initialised ``torch.distributed``
    group, in float64 on the CPU (``values`` itself without a group or with one process): the
    totals of losses or counts over a data loader that the Trainer shards across processes."""
    values = values.detach().to("cpu", torch.float64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = values.cuda() if dist.get_backend() == "nccl" else values.clone()
    dist.all_reduce(t)
    return t.cpu()


def from_first_process(value: int) -> int:
    """The first process's ``value`` on every process of an initialised ``torch.distributed``
    group (``value`` itself without one): a seed drawn once, the same everywhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    t = t.cuda() if dist.get_backend() == "nccl" else t
    dist.broadcast(t, 0)
    return int(t.item())
