"""MargLikSFTTrainer / MargLikSFTConfig (TRL's SFTTrainer with marginal-likelihood training):
each of TRL's dataset formats and loss masks, ``n_data`` against the tokens TRL's own loss
counts, the loss against TRL's NLL and against MargLikTrainer on the same batches, packing,
2 processes against 1, resume, and every refused input (TRL missing included).

The model is a 1-layer random Llama in float64 with LoRA through ``peft_config=``; the tokenizer
is a byte-level one with a ChatML template built offline (tests/sft_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from sft_data import (
    byte_tokenizer,
    dataset,
    lora_config,
    plain_sft_args,
    sft_args,
    tiny_llama,
)
from test_trainer_distributed import _free_port

import hf_marglik
from hf_marglik import MargLikSFTTrainer, MargLikTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = byte_tokenizer()


def _trainer(tmp_path, kind="conversational_prompt_completion", n=8, data=None, **kw):
    return MargLikSFTTrainer(
        model=tiny_llama(len(TOKENIZER)),
        args=sft_args(tmp_path / "out", **kw),
        train_dataset=dataset(kind, n) if data is None else data,
        processing_class=TOKENIZER,
        peft_config=lora_config(),
    )


def _plain_sft(tmp_path, kind, **kw):
    """TRL's own SFTTrainer on the same data and settings (weight decay 0)."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=tiny_llama(len(TOKENIZER)),
        args=plain_sft_args(tmp_path / "plain", **kw),
        train_dataset=dataset(kind),
        processing_class=TOKENIZER,
        peft_config=lora_config(),
    )


def _labelled(loader) -> int:
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in loader)


@torch.no_grad()
def _trl_count(trainer) -> int:
    """The tokens TRL's fused loss counts (its ``label_mask``) over the training data."""
    total = 0
    for batch in trainer.get_train_dataloader():
        out = trainer.model(**batch, fused_lm_head=True, use_cache=False)
        total += int(out.label_mask.sum())
    return total


# ---------------------------------------------------------------------------- formats
FORMATS = [
    ("prompt_completion", {}),
    ("conversational_prompt_completion", {}),
    ("messages", {}),
    ("messages", {"assistant_only_loss": True}),
    ("text", {}),
    ("prompt_completion", {"completion_only_loss": False}),
]


@pytest.mark.parametrize("kind, extra", FORMATS, ids=lambda v: str(v) if v else "default")
def test_each_format_trains_and_counts_trls_targets(tmp_path, kind, extra):
    """Every format trains with the marginal-likelihood steps, and ``n_data`` is exactly the
    number of tokens that TRL's own trainer, on the same data, puts into its loss."""
    trainer = _trainer(tmp_path, kind, **extra)
    trainer.train()
    assert len(trainer.margliks) == 2 and trainer.laplace is not None
    assert trainer.laplace.n_data == trainer.n_data
    plain = _plain_sft(tmp_path, kind, **extra)
    assert trainer.n_data == _trl_count(plain) == _labelled(trainer.get_train_dataloader())
    tokens = sum(len(ids) - 1 for ids in trainer.train_dataset["input_ids"])
    masked = kind in ("prompt_completion", "conversational_prompt_completion") and not extra
    if masked or extra.get("assistant_only_loss"):
        # only the answers (and their end-of-turn token) are data; 8 answers of 1-3 tokens
        assert 8 * 2 <= trainer.n_data <= 8 * 4 < tokens
    else:
        assert trainer.n_data == tokens
    logged = [h for h in trainer.state.log_history if "mean_token_accuracy" in h]
    assert logged and all(0 <= h["mean_token_accuracy"] <= 1 for h in logged)
    assert any("marglik" in e for e in trainer.state.log_history)


# ---------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("application", ["loss", "decoupled"])
def test_loss_is_trls_nll_plus_the_prior_term(tmp_path, application):
    """On one batch at the same weights: the evaluation loss equals TRL's NLL per target token,
    the training loss adds ``n_b · ½ θᵀPθ / N`` divided by the batch's ``n_b`` tokens (the
    MargLikTrainer formula, prior precision 1 at the start) with the prior in the loss, and
    nothing with the decoupled prior (the default), which acts at the optimizer step. TRL's
    fused log-probabilities are float32, hence the tolerance."""
    ours = _trainer(tmp_path, prior_application=application)
    plain = _plain_sft(tmp_path, "conversational_prompt_completion")
    plain.model.load_state_dict(ours.model.state_dict())
    batch = next(iter(ours.get_train_dataloader()))
    with torch.no_grad():
        for m in (ours.model, plain.model):
            m.eval()
        nll = float(plain.compute_loss(plain.model, dict(batch)))
        assert float(ours.compute_loss(ours.model, dict(batch))) == pytest.approx(nll, rel=1e-6)
        ours.model.train()
        ours._start(None)
        theta = torch.cat([p.flatten() for p in ours._params])
        prior = 0.5 * float(theta @ theta) / ours.n_data
        loss = float(ours.compute_loss(ours.model, dict(batch)))
        plain.model.train()
        nll = float(plain.compute_loss(plain.model, dict(batch)))
    expected = nll + prior if application == "loss" else nll
    assert loss == pytest.approx(expected, rel=1e-6)
    assert prior > 1e-3 * nll  # large enough to be seen at that tolerance


def test_equals_marglik_trainer_on_the_same_batches(tmp_path):
    """MargLikTrainer fed TRL's prepared dataset and collator, from the same initial weights,
    ends with the same histories, hyperparameters and parameters: one shared machinery."""
    from peft import get_peft_model
    from transformers import set_seed

    from hf_marglik import MargLikTrainingArguments

    sft = _trainer(tmp_path, num_train_epochs=2)
    sft.train()
    model = tiny_llama(len(TOKENIZER))
    set_seed(0)  # as SFTTrainer does before it applies peft_config
    model = get_peft_model(model, lora_config())
    a = sft.args
    args = MargLikTrainingArguments(
        output_dir=str(tmp_path / "hf"),
        **{k: getattr(a, k) for k in ("report_to", "use_cpu", "learning_rate", "seed")},
        **{k: getattr(a, k) for k in ("per_device_train_batch_size", "num_train_epochs")},
        per_device_eval_batch_size=a.per_device_eval_batch_size,
        save_strategy="no",
        disable_tqdm=True,
        likelihood="causal_lm",
        backend="ef",
        n_hypersteps=a.n_hypersteps,
    )
    hf = MargLikTrainer(
        model=model, args=args, train_dataset=sft.train_dataset, data_collator=sft.data_collator
    )
    hf.train()
    assert hf.n_data == sft.n_data
    assert hf.margliks == pytest.approx(sft.margliks, rel=1e-10)
    assert hf.losses == pytest.approx(sft.losses, rel=1e-10)
    for p, q in zip(hf._params, sft._params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize(
    "packed",
    [
        {"packing": True, "max_length": 120},
        {"packing": True, "packing_strategy": "bfd_split", "max_length": 30},
        {"padding_free": True, "max_length": None},
        {"packing": True, "max_length": 120, "use_cache": True},  # the cache is turned off
    ],
    ids=["bfd", "bfd_split", "padding_free", "bfd_use_cache"],
)
def test_packed_equals_unpacked(tmp_path, packed):
    """With the weights held fixed (learning rate 0), a packed run has the same ``N``, epoch
    loss and marginal likelihoods as the unpacked one: the sequences of a pack do not attend to
    each other in training or in the curvature pass, and each one's targets count."""
    kw = dict(learning_rate=0.0, kfac_approx="expand")
    ref = _trainer(tmp_path / "ref", "messages", **kw)
    ref.train()
    run = _trainer(tmp_path / "packed", "messages", **kw, **packed)
    assert run.padding_free
    batch = next(iter(run.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    run.train()
    if "bfd_split" in packed.values():
        # each 42-token sequence is cut at 30: the second piece is a sequence of its own,
        # whose first token is no target (as in TRL's loss)
        assert run.n_data == ref.n_data - 8
        return
    assert run.n_data == ref.n_data
    assert run.losses == pytest.approx(ref.losses, rel=1e-10)
    assert run.margliks == pytest.approx(ref.margliks, rel=1e-10)
    assert run.model.config.use_cache is False  # a KV cache would join the sequences


# ---------------------------------------------------------------------------- processes, resume
def test_two_processes_equal_one_process(tmp_path):
    """Prompt-completion, 2 CPU processes (gloo) with half the per-device batch against one:
    ``N``, the log marginal likelihoods, precisions and parameters agree to rounding."""
    worker = os.path.join(os.path.dirname(__file__), "sft_worker.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    for cmd, out in (
        ([sys.executable, worker, str(single), "8"], single),
        ([*ddp, f"--master_port={_free_port()}", worker, str(multi), "4"], multi),
    ):
        out.mkdir()
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
    ref = json.loads((single / "result-0.json").read_text())
    assert ref["world_size"] == 1 and len(ref["margliks"]) == 2 * 3
    for rank in range(2):
        got = json.loads((multi / f"result-{rank}.json").read_text())
        assert got["world_size"] == 2 and got["n_data"] == ref["n_data"]
        for key in ("margliks", "prior_precision", "log_marglik", "params"):
            assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_resume_equals_uninterrupted(tmp_path):
    """Checkpoint 2 of 4 steps (after the first epoch's update) resumed by a new trainer ends
    with the uninterrupted run's histories, hyperparameters and parameters."""
    kw = dict(num_train_epochs=2, save_strategy="steps", save_steps=2)
    full = _trainer(tmp_path / "full", **kw)
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-2"
    assert (ckpt / "marglik_state.pt").is_file()
    resumed = _trainer(tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.margliks == pytest.approx(full.margliks, rel=1e-12)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-12)
    assert resumed.marglik_update_steps == full.marglik_update_steps == [2, 4]
    torch.testing.assert_close(
        resumed.laplace.prior_precision, full.laplace.prior_precision, rtol=1e-12, atol=0
    )
    for p, q in zip(resumed._params, full._params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "settings, match",
    [
        ({"likelihood": "classification"}, "likelihood='causal_lm'"),
        ({"loss_type": "dft"}, "loss_type='nll'"),
        ({"packing": True, "packing_strategy": "wrapped"}, "packing_strategy='bfd'"),
        ({"packing": True, "kfac_approx": "reduce"}, "kfac_approx='expand'"),
        ({"packing": True, "pad_to_multiple_of": 8}, "pad_to_multiple_of=None"),
        ({"eval_packing": True}, "eval_packing=None"),
    ],
    ids=["likelihood", "dft", "wrapped", "reduce", "pad_to_multiple_of", "eval_packing"],
)
def test_config_refuses_what_the_curvature_cannot_handle(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        sft_args(tmp_path, **settings)


def test_chunked_nll_alias_is_accepted(tmp_path):
    with pytest.warns(FutureWarning):
        assert sft_args(tmp_path, loss_type="chunked_nll").loss_type == "nll"


def test_bad_inputs_raise_before_training(tmp_path):
    """Each names the setting and the fix, at construction (before TRL tokenizes)."""
    from datasets import Dataset
    from trl import SFTConfig

    questions = Dataset.from_dict({"question": ["What is 1 plus 1?"], "answer": ["2"]})
    with pytest.raises(ValueError, match="dataset_text_field='text'.*formatting_func"):
        _trainer(tmp_path, data=questions)
    half = Dataset.from_dict({"prompt": ["What is 1 plus 1?"]})
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        _trainer(tmp_path, data=half)
    no_template = byte_tokenizer(chat_template=None)
    for kind in ("messages", "conversational_prompt_completion"):
        with pytest.raises(ValueError, match="no chat template.*chat_template_path"):
            MargLikSFTTrainer(
                model=tiny_llama(len(no_template)),
                args=sft_args(tmp_path),
                train_dataset=dataset(kind),
                processing_class=no_template,
            )
    with pytest.raises(ValueError, match="eval dataset .*dataset_text_field"):
        MargLikSFTTrainer(
            model=tiny_llama(len(TOKENIZER)),
            args=sft_args(tmp_path),
            train_dataset=dataset("text"),
            eval_dataset=questions,
            processing_class=TOKENIZER,
        )
    plain_args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(TypeError, match="args=MargLikSFTConfig"):
        MargLikSFTTrainer(
            model=tiny_llama(len(TOKENIZER)), args=plain_args, train_dataset=dataset("text")
        )
    big_vocab = tiny_llama(2048)
    with pytest.raises(ValueError, match="backend='ggn-mc'"):
        MargLikSFTTrainer(
            model=big_vocab,
            args=sft_args(tmp_path, backend="ggn"),
            train_dataset=dataset("text"),
            processing_class=TOKENIZER,
            peft_config=lora_config(),
        )
    # a plain-text dataset needs no template; the small vocabulary takes the exact GGN
    MargLikSFTTrainer(
        model=tiny_llama(len(no_template)),
        args=sft_args(tmp_path, backend="ggn"),
        train_dataset=dataset("text"),
        processing_class=no_template,
        peft_config=lora_config(),
    )


def test_moe_auxiliary_loss_is_refused(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )

    def build(**kw):
        return MargLikSFTTrainer(
            model=MixtralForCausalLM(cfg).double(),
            args=sft_args(tmp_path, **kw),
            train_dataset=dataset("text"),
            processing_class=TOKENIZER,
            peft_config=lora_config(),
        )

    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
        build()
    build(router_aux_loss_coef=0.0)


def test_without_trl_the_package_imports_and_the_sft_classes_say_how_to_install(
    monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "hf_marglik.sft", raising=False)
    for name in ("MargLikSFTTrainer", "MargLikSFTConfig"):
        monkeypatch.delitem(vars(hf_marglik), name, raising=False)
    assert hf_marglik.MargLikTrainer is MargLikTrainer
    for name in ("MargLikSFTTrainer", "MargLikSFTConfig"):
        with pytest.raises(ImportError, match=r"pip install hf_marglik\[trl\]"):
            getattr(hf_marglik, name)
    with pytest.raises(ImportError, match=r"pip install hf_marglik\[trl\]"):
        from hf_marglik import MargLikSFTTrainer  # noqa: F401
    # `from hf_marglik import *` takes the names of __all__, which leaves them out without TRL
    code = "import sys; sys.modules['trl'] = None; import hf_marglik as h; "
    code += "assert 'MargLikTrainer' in h.__all__ and 'MargLikSFTConfig' not in h.__all__"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------- the recipe
def test_recipe_chats_fit_and_are_tokenised_as_trl_does(tmp_path):
    """scripts/train.py's sft task: the article is cut so the rendered chat fits
    max_seq_length, and the test split's own tokenisation equals TRL's preparation."""
    from datasets import Dataset

    from hf_marglik.recipe.arguments import DataArguments
    from hf_marglik.recipe.data import TextData
    from hf_marglik.recipe.sft import chat_splits, encode_chat

    texts = ["A long article about football. " * 6, "Shares fell.", "A new phone. " * 3]
    split = Dataset.from_dict({"text": texts, "label": [1, 0, 2]})
    data = TextData({"train": split, "test": split}, ["business", "sport", "tech"])
    out = chat_splits(data, TOKENIZER, DataArguments(max_seq_length=96))
    assert all(len(ids) <= 96 for ids in out["test"]["input_ids"])
    assert len(out["test"]["input_ids"][0]) >= 90  # the long article was cut to fit
    assert "Shares fell." in out["train"]["prompt"][1][0]["content"]
    assert [c[0]["content"] for c in out["train"]["completion"]] == ["sport", "business", "tech"]
    trainer = _trainer(tmp_path, data=out["train"])
    assert trainer.train_dataset["input_ids"] == out["test"]["input_ids"]
    assert trainer.train_dataset["labels"] == out["test"]["labels"]
    ds = dataset("conversational_prompt_completion")
    ours = [encode_chat(TOKENIZER, p, c) for p, c in zip(ds["prompt"], ds["completion"])]
    trainer = _trainer(tmp_path, data=ds)
    assert [o["labels"] for o in ours] == trainer.train_dataset["labels"]
