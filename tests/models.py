"""The model builders of the tests and the benchmarks, built from configs (no downloads).

This is the one set of builders: the tests import it as ``models`` (``tests/`` is on
``sys.path`` under pytest and for the worker scripts run from here), and the benchmark scripts
in ``benchmarks/`` through ``benchlib.model_builders()``, which puts ``tests/`` on ``sys.path``.
It stays here, beside the tests, because most of it is test fixtures (tiny float64 models,
batches with padding and -100 labels, datasets for trainer runs) that the test files and
worker scripts import by this name; the benchmarks need only :func:`randomise_trainable` and
the ``*_lora_model`` builders, with their own sizes and dtype.

Every test builder returns ``(model, batches)``: ``batches`` is a list (a data loader stand-in)
of dict batches (Hugging Face style, targets under ``"labels"``) or ``(x, y)`` pairs (plain
MLPs). Trainable parameters are drawn at random (LoRA's ``B = 0`` initialisation would make the
curvature of every ``lora_A`` vanish and hide bugs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DTYPE = torch.float64
IGNORE_INDEX = -100


def randomise_trainable(
    model: nn.Module, seed: int | torch.Generator, scale: float = 0.5, only: str | None = None
) -> nn.Module:
    """Redraw every trainable parameter (every one with ``only`` in its name, when given) i.i.d.
    N(0, scale²), reproducibly: from a generator seeded with ``seed``, or from ``seed`` itself
    when it is a generator."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ----------------------------------------------------------------------------------- MLPs


def mlp(d_in: int = 3, d_hidden: int = 4, d_out: int = 3, seed: int = 0, bias: bool = True):
    """``Linear → tanh → Linear`` in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, d_hidden, bias=bias),
        nn.Tanh(),
        nn.Linear(d_hidden, d_out, bias=bias),
    ).to(DTYPE)


def mlp_classification(
    n_batches: int = 2, batch: int = 5, d_in: int = 3, n_classes: int = 3, seed: int = 0
):
    """An MLP classifier and ``(x, y)`` batches; the second batch has one label -100."""
    model = mlp(d_in, 4, n_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for i in range(n_batches):
        x = torch.randn(batch, d_in, generator=g, dtype=DTYPE)
        y = torch.randint(n_classes, (batch,), generator=g)
        if i == 1:
            y[2] = IGNORE_INDEX
        batches.append((x, y))
    return model, batches


def mlp_peer_loader(likelihood: str = "classification", batch_size: int = 5):
    """An MLP and its data as one ``DataLoader`` of ``(x, y)`` for comparisons with
    laplace-torch (which has no ignore_index: the -100 label becomes 0): ``(model, loader,
    batches)``."""
    from torch.utils.data import DataLoader, TensorDataset

    if likelihood == "classification":
        model, batches = mlp_classification()
        batches[1][1][2] = 0
    else:
        model, batches = mlp_regression()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    return model, DataLoader(TensorDataset(X, Y), batch_size=batch_size), batches


def mlp_regression(
    n_batches: int = 2, batch: int = 5, d_in: int = 3, d_out: int = 2, seed: int = 0
):
    """An MLP regressor and ``(x, y)`` batches with ``y`` of shape ``(batch, d_out)``."""
    model = mlp(d_in, 4, d_out, seed)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, d_in, generator=g, dtype=DTYPE)
        y = torch.randn(batch, d_out, generator=g, dtype=DTYPE)
        batches.append((x, y))
    return model, batches


# ------------------------------------------------------------- deep linear sequence models


class DeepLinearSeq(nn.Module):
    """A deep linear network applied at every position of ``x`` (batch, seq, d_in).

    ``setting="expand"``: outputs at padded positions are zeroed and the (batch, seq, d_out)
    outputs are flattened to (batch, seq·d_out), so the regression loss is a sum of
    per-position MSE terms: K-FAC-expand is exact here.
    ``setting="reduce"``: the outputs are averaged over the non-padded positions before the
    loss, one MSE term per sequence: K-FAC-reduce is exact here (Eschenhagen et al., 2023).
    """

    def __init__(self, dims: list[int], setting: str, bias: bool = True):
        super().__init__()
        if setting not in ("expand", "reduce"):
            raise ValueError(setting)
        self.setting = setting
        self.layers = nn.Sequential(
            *[nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])]
        )

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.layers(x)
        m = torch.ones(x.shape[:2], dtype=h.dtype) if attention_mask is None else attention_mask
        m = m.to(h.dtype).unsqueeze(-1)
        if self.setting == "expand":
            return (h * m).reshape(h.shape[0], -1)
        return (h * m).sum(1) / m.sum(1)


def deep_linear_seq(
    setting: str,
    padded: bool = True,
    dims: tuple[int, ...] = (3, 4, 2),
    n_batches: int = 2,
    batch: int = 3,
    seq: int = 4,
    bias: bool = True,
    seed: int = 0,
):
    """A :class:`DeepLinearSeq` and dict batches ``{"x", "attention_mask", "labels"}``.

    With ``padded`` some sequences are right-padded; the padded inputs are random (non-zero),
    so any K-FAC factor that counts them is visibly wrong. Use ``dict_key_x="x"``.
    """
    torch.manual_seed(seed)
    model = DeepLinearSeq(list(dims), setting, bias).to(DTYPE)
    randomise_trainable(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    d_out = dims[-1]
    batches = []
    for i in range(n_batches):
        x = torch.randn(batch, seq, dims[0], generator=g, dtype=DTYPE)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if padded:
            mask[0, seq - 1 - i :] = 0
            mask[-1, seq - 2 :] = 0
        if setting == "expand":
            y = torch.randn(batch, seq, d_out, generator=g, dtype=DTYPE) * mask.unsqueeze(-1)
            y = y.reshape(batch, seq * d_out)
        else:
            y = torch.randn(batch, d_out, generator=g, dtype=DTYPE)
        batches.append({"x": x, "attention_mask": mask, "labels": y})
    return model, batches


# ------------------------------------------------------------------------ LoRA transformers
# Each family has a model builder (``*_lora_model``: random weights from a config, then LoRA;
# sizes, dtype and attention kernel are arguments, so the benchmarks build their models here
# too) and a test builder (``*_lora``: the tiny float64 model, every trainable parameter redrawn,
# and random token batches).


def add_lora(
    model: nn.Module,
    task_type: str,
    targets: list[str],
    r: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    **kw,
) -> nn.Module:
    """peft LoRA of rank ``r`` on the ``targets`` modules (``lora_alpha`` 2r unless given)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        **kw,
    )
    return get_peft_model(model, cfg)


def _token_batches(
    vocab: int,
    n_batches: int,
    batch: int,
    seq: int,
    padded: bool,
    seed: int,
    pad_token_id: int = 0,
) -> list[dict]:
    """Random token batches; with ``padded`` the first sequence of each batch is right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if padded:
            mask[0, seq - 2 - (i % 2) :] = 0
            ids[mask == 0] = pad_token_id
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def bert_lora_model(
    num_labels: int = 3,
    regression: bool = False,
    hidden: int = 8,
    layers: int = 1,
    heads: int = 2,
    vocab: int = 20,
    r: int = 2,
    lora_alpha: float | None = None,
    max_positions: int = 32,
    attn: str = "eager",
    dtype: torch.dtype = DTYPE,
    seed: int = 0,
    targets: tuple[str, ...] = ("query", "value"),
) -> nn.Module:
    """Random BERT for sequence classification (regression with ``num_labels`` outputs), no
    dropout, with LoRA on ``targets`` (query/value) and the classifier head in
    ``modules_to_save``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        problem_type="regression" if regression else "single_label_classification",
        attn_implementation=attn,
    )
    model = BertForSequenceClassification(cfg).to(dtype)
    return add_lora(model, "SEQ_CLS", list(targets), r, lora_alpha, modules_to_save=["classifier"])


def bert_lora(
    num_labels: int = 3,
    regression: bool = False,
    hidden: int = 8,
    layers: int = 1,
    r: int = 2,
    n_batches: int = 2,
    batch: int = 3,
    seq: int = 5,
    padded: bool = True,
    ignore_one: bool = True,
    seed: int = 0,
):
    """Tiny random BERT for sequence classification (or regression with ``num_labels``
    outputs) with peft LoRA on query/value and the classifier head in ``modules_to_save``."""
    model = bert_lora_model(num_labels, regression, hidden, layers, r=r, seed=seed)
    randomise_trainable(model, seed)
    batches = _token_batches(model.config.vocab_size, n_batches, batch, seq, padded, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for i, b in enumerate(batches):
        if regression:
            b["labels"] = torch.randn(batch, num_labels, generator=g, dtype=DTYPE)
        else:
            y = torch.randint(num_labels, (batch,), generator=g)
            if ignore_one and i == n_batches - 1:
                y[-1] = IGNORE_INDEX
            b["labels"] = y
    return model, batches


def _lm_labels(batches: list[dict], ignore_one: bool, pad_label: int | None) -> list[dict]:
    """``labels = input_ids``; padded positions get ``pad_label`` (-100 in HF, or a real token
    id to check that ``attention_mask`` alone masks them); optionally one -100 inside a row."""
    for i, b in enumerate(batches):
        y = b["input_ids"].clone()
        if pad_label is not None:
            y[b["attention_mask"] == 0] = pad_label
        if ignore_one and i == 0:
            y[-1, 2] = IGNORE_INDEX
        b["labels"] = y
    return batches


def gpt2_lora_model(
    hidden: int = 8,
    layers: int = 1,
    heads: int = 2,
    vocab: int = 16,
    r: int = 2,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    dropout: float = 0.0,
    max_positions: int = 32,
    attn: str | None = "eager",
    dtype: torch.dtype = DTYPE,
    seed: int = 0,
) -> nn.Module:
    """Random GPT-2 causal LM (``dropout``: its residual, embedding and attention dropout) with
    LoRA on ``c_attn`` (a Conv1D: ``fan_in_fan_out``); ``attn=None``: transformers' default."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=max_positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    return add_lora(
        model, "CAUSAL_LM", ["c_attn"], r, lora_alpha, lora_dropout, fan_in_fan_out=True
    )


def _rmsnorm_in_input_dtype(model: nn.Module) -> None:
    """LLaMA's RMSNorm computes in float32 whatever the input dtype; its rounding (~1e-8) would
    swamp float64 comparisons. Swap in the same formula in the input's dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class RMSNormNative(LlamaRMSNorm):
        def forward(self, h: Tensor) -> Tensor:
            var = h.pow(2).mean(-1, keepdim=True)
            return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

    for m in model.modules():
        if type(m) is LlamaRMSNorm:
            m.__class__ = RMSNormNative


def llama_lora_model(
    hidden: int = 8,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    vocab: int = 16,
    r: int = 2,
    intermediate: int | None = None,
    lora_alpha: float | None = None,
    max_positions: int = 32,
    dtype: torch.dtype = DTYPE,
    seed: int = 0,
) -> nn.Module:
    """Random LLaMA causal LM (MLP width ``intermediate``, default 2·hidden) with LoRA on
    ``q_proj``/``v_proj``; in float64 its RMSNorm computes in float64 too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",  # LLaMA's eager softmax runs in float32
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    if dtype == torch.float64:
        _rmsnorm_in_input_dtype(model)
    return add_lora(model, "CAUSAL_LM", ["q_proj", "v_proj"], r, lora_alpha)


def _causal_lm_lora(
    build,
    hidden: int = 8,
    layers: int = 1,
    vocab: int = 16,
    r: int = 2,
    n_batches: int = 2,
    batch: int = 2,
    seq: int = 5,
    padded: bool = True,
    ignore_one: bool = True,
    pad_label: int | None = IGNORE_INDEX,
    seed: int = 0,
):
    """A tiny causal LM from ``build`` (a ``*_lora_model``) with every trainable parameter
    redrawn, and token batches labelled by :func:`_lm_labels`."""
    model = build(hidden, layers, vocab=vocab, r=r, seed=seed)
    randomise_trainable(model, seed)
    batches = _token_batches(vocab, n_batches, batch, seq, padded, seed + 1)
    return model, _lm_labels(batches, ignore_one, pad_label)


def gpt2_lora(**kw):
    """Tiny random GPT-2 causal LM with LoRA on ``c_attn`` (a Conv1D: ``fan_in_fan_out``);
    ``kw``: the sizes and batch options of :func:`_causal_lm_lora`."""
    return _causal_lm_lora(gpt2_lora_model, **kw)


def llama_lora(**kw):
    """Tiny random LLaMA causal LM with LoRA on ``q_proj``/``v_proj``; ``kw``: the sizes and
    batch options of :func:`_causal_lm_lora`."""
    return _causal_lm_lora(llama_lora_model, **kw)


# ------------------------------------------------------------- k-bit bases (QLoRA)
# A tiny random Llama saved with save_pretrained and loaded back through from_pretrained with a
# BitsAndBytesConfig (bitsandbytes, the qlora extra), and its float twin with the dequantised
# weights: tests/test_qlora.py and benchmarks/gpu_check.py.


def tiny_llama_folder(path, vocab: int = 32, layers: int = 2, seed: int = 0):
    """Save a random float32 Llama (hidden 64: 4-bit blocks of 64 fit every weight) to ``path``;
    return ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="sdpa",
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _random_lora(model: nn.Module, targets: list[str], seed: int) -> nn.Module:
    model = add_lora(model, "CAUSAL_LM", targets, r=2, lora_alpha=4)
    return randomise_trainable(model, seed, scale=0.3)  # B = 0 would hide the A curvature


def kbit_llama_lora(
    folder,
    bits: int = 4,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
) -> nn.Module:
    """The Llama saved in ``folder`` loaded in ``bits`` bits on ``device``, prepared by peft's
    ``prepare_model_for_kbit_training`` (no gradient checkpointing), with random LoRA factors
    (r=2) on ``targets``."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map={"": device}, dtype=torch.float32
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _random_lora(model, list(targets), seed)


def dequantised_4bit(layer) -> Tensor:
    """The float weight a ``bitsandbytes.nn.Linear4bit`` layer computes with."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def dequantised_twin(folder, qmodel: nn.Module, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """The float32 model of ``folder`` whose 4-bit linear weights are ``qmodel``'s dequantised
    ones, with ``qmodel``'s LoRA factors, on ``qmodel``'s device."""
    from transformers import AutoModelForCausalLM

    from hf_marglik.quantization import kbit_layers

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quantised = dict(kbit_layers(qmodel.get_base_model()))
    with torch.no_grad():
        for name, m in ref.named_modules():
            q = quantised.get(name) or quantised.get(name + ".base_layer")
            if q is not None:
                m.weight.copy_(dequantised_4bit(q).to(m.weight.device))
    ref = _random_lora(ref, list(targets), 0).to(next(qmodel.parameters()).device)
    trained = dict(qmodel.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    return ref


# ------------------------------------------------------------- trainer runs in subprocesses
class TinyNet(nn.Module):
    """A 4-6-3 tanh MLP taking ``batch["x"]`` (``dict_key_x="x"``): the model of the
    multi-process and kill/resume worker scripts."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


class TinyData(torch.utils.data.Dataset):
    """24 fixed float64 examples ``{"x", "labels"}`` (3 classes) for :class:`TinyNet`."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class DictDataset(torch.utils.data.Dataset):
    """A list of dict examples as a map-style dataset (for ``MargLikTrainer`` tests)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_trainer_args(output_dir, **kw):
    """``MargLikTrainingArguments`` for fast CPU trainer tests (no saving, 3 hyper-steps,
    batch 8, step size 1e-2, seed 0), with laplace-torch's algorithm: the exact GGN from a pass
    at every update and the prior in the loss (the reference the trainer tests compare with; the
    package defaults, the online Monte-Carlo curvature and the decoupled prior, are tested in
    tests/test_online.py and tests/test_lora_prior.py); ``kw`` overrides any field."""
    from hf_marglik.training_args import MargLikTrainingArguments

    base = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        n_hypersteps=3,
        disable_tqdm=True,
        seed=0,
        backend="ggn",
        marglik_curvature="fit",
        prior_application="loss",
    )
    base.update(kw)
    return MargLikTrainingArguments(**base)


def run_worker(main, *args) -> None:
    """Run a multi-process test worker's ``main(*args)``, then end the process without the
    interpreter's teardown. The results are written by then; under ``torch.distributed.run`` the
    teardown aborted now and then ("terminate called without an active exception", a C++
    thread destroyed at exit; about 1 run in 15 on a loaded 2-core machine). An exception in
    ``main`` still ends the process with an error."""
    import os
    import sys

    try:
        main(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
