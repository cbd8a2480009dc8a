"""Offline builders for the TRL tests (tests/test_sft.py, tests/sft_worker.py): a byte-level
tokenizer with a ChatML chat template (built with ``tokenizers``, nothing downloaded), a tiny
random Llama over its 259 tokens, and small datasets in each of TRL's formats."""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML with ``{% generation %}`` markers around the assistant's turns (for TRL's
``assistant_only_loss``), the end-of-turn token inside them."""


def byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A fast tokenizer with one token per byte (256) plus ``<|im_start|>``, ``<|im_end|>``
    (end of turn, also EOS) and ``<pad>``: any text encodes, offsets work (assistant masks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=chat_template,
    )
    return tokenizer


def tiny_llama(vocab: int, dtype: torch.dtype = torch.float64, seed: int = 0, hidden: int = 16):
    """A 1-layer random Llama causal LM (no LoRA: ``peft_config=`` adds it in the tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(dtype)


def lora_config(r: int = 2):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )


def _sums(n: int) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 50, (n, 2), generator=g).tolist()
    return [(f"What is {a} plus {b}?", str(a + b)) for a, b in pairs]


def dataset(kind: str, n: int = 8):
    """``n`` additions in one of TRL's formats: ``"prompt_completion"`` (strings),
    ``"conversational_prompt_completion"``, ``"messages"`` (a user and an assistant turn) or
    ``"text"``."""
    from datasets import Dataset

    rows = _sums(n)
    if kind == "prompt_completion":
        data = {"prompt": [q for q, _ in rows], "completion": [" " + a for _, a in rows]}
    elif kind == "conversational_prompt_completion":
        data = {
            "prompt": [[{"role": "user", "content": q}] for q, _ in rows],
            "completion": [[{"role": "assistant", "content": a}] for _, a in rows],
        }
    elif kind == "messages":
        data = {
            "messages": [
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                for q, a in rows
            ]
        }
    elif kind == "text":
        data = {"text": [f"{q} {a}" for q, a in rows]}
    else:
        raise ValueError(kind)
    return Dataset.from_dict(data)


_BASE = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    learning_rate=1e-2,
    num_train_epochs=1,
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
)
"""Settings of both configs: float math as the model's dtype (no bf16), no gradient
checkpointing, batch 4, one epoch, no saving."""


def sft_args(output_dir, **kw):
    """``MargLikSFTConfig`` for fast CPU tests (:data:`_BASE`, 2 hyper-steps, the empirical
    Fisher: deterministic and one backward per target token); ``kw`` overrides any field."""
    from hf_marglik import MargLikSFTConfig

    return MargLikSFTConfig(
        output_dir=str(output_dir), **{**_BASE, "n_hypersteps": 2, "backend": "ef", **kw}
    )


def plain_sft_args(output_dir, **kw):
    """TRL's own ``SFTConfig`` with the same settings as :func:`sft_args`."""
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), **{**_BASE, **kw})
