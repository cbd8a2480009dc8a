"""Parallel set-ups: ``MargLikTrainer`` refuses FSDP, DeepSpeed, Megatron-LM and sharded
``ParallelismConfig`` set-ups before any work, with an error that names the supported ones
(one process; DDP with torchrun / accelerate launch), and accepts those.

The requests are made the way a user makes them: ``MargLikTrainingArguments(fsdp=...)``,
``parallelism_config=ParallelismConfig(...)``, or the environment variables that
``accelerate launch --use_fsdp / --use_deepspeed / ...`` sets for the script it starts. (With
transformers 5.24 and accelerate 1.15, ``TrainingArguments(deepspeed=...)`` cannot even be
built without the deepspeed package, which is not a dependency.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from models import TinyNet
from transformers import TrainingArguments

from hf_marglik import MargLikTrainer, MargLikTrainingArguments
from hf_marglik.parallel import requested_sharding

ACCELERATE_VARS = (
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_USE_MEGATRON_LM",
    "ACCELERATE_USE_PARALLELISM_CONFIG",
    "PARALLELISM_CONFIG_DP_REPLICATE_SIZE",
    "PARALLELISM_CONFIG_DP_SHARD_SIZE",
    "PARALLELISM_CONFIG_TP_SIZE",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ACCELERATE_VARS:
        monkeypatch.delenv(key, raising=False)


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(8)]


def _args(tmp_path, **kw) -> MargLikTrainingArguments:
    return MargLikTrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        dict_key_x="x",
        save_strategy="no",
        **kw,
    )


def _assert_refused(make, *names):
    with pytest.raises(ValueError) as err:
        make()
    msg = str(err.value)
    for name in names:
        assert name in msg
    # the supported set-ups and the fix are named
    assert "Supported: one process" in msg and "DDP" in msg
    assert "torchrun --nproc_per_node" in msg and "accelerate launch" in msg


@pytest.mark.parametrize(
    "kw",
    [
        {"fsdp": True},
        {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}},
        {"fsdp": "full_shard auto_wrap"},  # the legacy string form
    ],
    ids=["fsdp", "fsdp2-config", "legacy-string"],
)
def test_fsdp_training_arguments_are_refused(tmp_path, kw):
    args = _args(tmp_path, **kw)
    _assert_refused(
        lambda: MargLikTrainer(model=TinyNet(), args=args, train_dataset=_data()), "FSDP", "fsdp"
    )
    # positional arguments, as Trainer(model, args) allows
    _assert_refused(lambda: MargLikTrainer(TinyNet(), args, train_dataset=_data()), "FSDP")


def test_tensor_parallel_config_is_refused(tmp_path):
    from accelerate.parallelism_config import ParallelismConfig

    args = _args(tmp_path, parallelism_config=ParallelismConfig(tp_size=2))
    _assert_refused(lambda: MargLikTrainer(model=TinyNet(), args=args), "tp_size=2")


@pytest.mark.parametrize(
    "env, names",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, ["FSDP", "--use_fsdp"]),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["DeepSpeed", "--use_deepspeed"]),
        ({"ACCELERATE_USE_MEGATRON_LM": "True"}, ["Megatron-LM"]),
        (
            {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2"},
            ["dp_shard_size=2"],
        ),
    ],
    ids=["fsdp", "deepspeed", "megatron", "dp-shard"],
)
def test_accelerate_launch_sharding_is_refused(tmp_path, monkeypatch, env, names):
    # the arguments are built first: with ACCELERATE_USE_DEEPSPEED set, TrainingArguments itself
    # needs the deepspeed package
    args = _args(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _assert_refused(
        lambda: MargLikTrainer(model=TinyNet(), args=args, train_dataset=_data()), *names
    )


def test_deepspeed_arguments_are_refused(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        # what a user without deepspeed meets first: transformers' own error
        with pytest.raises(Exception, match="deepspeed"):
            TrainingArguments(output_dir=str(tmp_path), deepspeed={"zero_optimization": {}})
    args = _args(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # what deepspeed=... leaves in the args
    _assert_refused(lambda: MargLikTrainer(model=TinyNet(), args=args), "DeepSpeed")


def test_supported_set_ups_are_accepted(tmp_path, monkeypatch):
    # plain DDP as accelerate launch describes it: the flags present but off
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    args = _args(tmp_path, bf16=True, gradient_checkpointing=True, factor_rank=4)
    assert requested_sharding(args) == []
    trainer = MargLikTrainer(model=TinyNet(), args=args, train_dataset=_data())
    assert not trainer.is_fsdp_enabled and not trainer.is_deepspeed_enabled
    # a ParallelismConfig of replicated data parallelism only is DDP
    replicated = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true"}
    replicated |= {"PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2", "PARALLELISM_CONFIG_TP_SIZE": "1"}
    assert requested_sharding(None, replicated) == []


def test_every_request_is_named_once(tmp_path):
    args = _args(tmp_path, fsdp=True)
    found = requested_sharding(
        args, {"ACCELERATE_USE_FSDP": "1", "ACCELERATE_USE_DEEPSPEED": "yes"}
    )
    assert [f.split(" (")[0] for f in found] == ["FSDP", "FSDP", "DeepSpeed"]
    assert len(set(found)) == 3
