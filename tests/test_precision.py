"""Mixed precision and gradient checkpointing.

bf16: a bf16 model's curvature is accumulated and decomposed in float32, and its log marginal
likelihood stays within a stated tolerance of the float32 run.

Gradient checkpointing: a model that trains with it is fitted with it (the curvature pass and
the GLM predictive's Jacobians run the checkpointed path: each backward pass re-runs the
checkpointed layers), with dropout off, to the same curvature as without it (float64, to
rounding), and the peak memory of a fit stays within 1.1× that of a training step at the same
batch size. Each of these fails when the pass runs without checkpointing
(``test_memory_check_fails_for_a_fit_without_checkpointing`` shows the memory measure does).
"""

import copy
from functools import partial

import pytest
import torch
from memtrack import LiveBytes
from models import (
    DictDataset,
    add_lora,
    bert_lora,
    llama_lora_model,
    randomise_trainable,
    tiny_trainer_args,
)
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from hf_marglik import Laplace
from hf_marglik import curvature as C

BF16_RTOL = 0.01
"""Stated tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4%) in every
activation; the log marginal likelihood of a bf16 model is within 1% of the float32 one (measured:
0.07% for kron and diag on this model)."""

F64 = torch.float64
DROPOUT = 0.3
"""Dropout of the models that are fitted with and without checkpointing: with it on in either
fit, the two would differ by far more than rounding."""
MEMORY_RATIO = 1.1
"""The bound (issue 16): peak memory of one fit ≤ 1.1 × that of one training step, same batch."""


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, _lm_batches(32, g)


def _lm_batches(vocab, g, n=4, seq=12):
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq - 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {
            "input_ids": ids[i : i + 2],
            "attention_mask": mask[i : i + 2],
            "labels": labels[i : i + 2],
        }
        for i in range(0, n, 2)
    ]


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_bf16_model_curvature_in_float32_close_to_float32_run(structure):
    model, batches = _llama()
    half = copy.deepcopy(model).to(torch.bfloat16)
    ref = Laplace(
        model, "causal_lm", hessian_structure=structure, backend="ef", prior_precision=1.0
    ).fit(batches)
    lap = Laplace(
        half, "causal_lm", hessian_structure=structure, backend="ef", prior_precision=1.0
    ).fit(batches)
    assert lap.dtype == torch.float32 and lap.loss.dtype == torch.float32
    if structure == "kron":
        assert all(f.dtype == torch.float32 for f, _ in lap.kron_factors())
    a, b = float(lap.log_marginal_likelihood()), float(ref.log_marginal_likelihood())
    assert abs(a - b) <= BF16_RTOL * abs(b), (a, b)
    assert lap.n_data == ref.n_data


# ------------------------------------------------------------------ gradient checkpointing
def _llama_dropout():
    """float64 LLaMA, attention dropout and LoRA dropout on (q_proj, v_proj)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_dropout=DROPOUT,
        attn_implementation="eager",
    )
    model = add_lora(LlamaForCausalLM(cfg).to(F64), "CAUSAL_LM", ["q_proj", "v_proj"], 4)
    model = _with_lora_dropout(model)
    return randomise_trainable(model, 0, 0.3), _lm_batches(24, torch.Generator().manual_seed(1))


def _gpt2_dropout():
    """float64 GPT-2, residual, embedding, attention and LoRA dropout on (c_attn)."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=24,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=DROPOUT,
        embd_pdrop=DROPOUT,
        attn_pdrop=DROPOUT,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg).to(F64)
    model = add_lora(model, "CAUSAL_LM", ["c_attn"], 2, lora_dropout=DROPOUT, fan_in_fan_out=True)
    return randomise_trainable(model, 0, 0.3), _lm_batches(24, torch.Generator().manual_seed(1))


def _with_lora_dropout(model):
    # peft makes an Identity for lora_dropout=0 and refuses nothing else; put a Dropout there
    for m in model.modules():
        drop = getattr(m, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            for key in drop:
                drop[key] = nn.Dropout(DROPOUT)
    return model


def _calls_of_checkpointed_layers(model) -> tuple[list[int], list]:
    """A count of the calls of the first child of every checkpointed layer (called once per
    forward pass, and again whenever checkpointing re-runs the layer), and the hook handles."""
    count, handles = [0], []

    def hook(*args):
        count[0] += 1

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            handles.append(next(m.children()).register_forward_hook(hook))
    return count, handles


def _modes(model):
    return [m.training for m in model.modules()]


def _enable_checkpointing(model, reentrant=False):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    return model


CASES = [
    ("llama", "kron", None, "ggn-mc", False),
    ("llama", "kron", 4, "ggn-mc", False),
    ("llama", "full", None, "ef", False),
    ("llama", "diag", None, "ef", False),
    ("llama", "kron", None, "ggn-mc", True),
    ("gpt2", "kron", None, "ggn-mc", False),
    ("gpt2", "kron", 2, "ef", False),
    ("gpt2", "full", None, "ggn-mc", False),
]


@pytest.mark.parametrize(
    "arch, structure, rank, backend, reentrant",
    CASES,
    ids=[f"{a}-{s}-rank{r}-{b}" + ("-reentrant" if re else "") for a, s, r, b, re in CASES],
)
def test_checkpointed_fit_equals_the_plain_fit(
    one_thread, arch, structure, rank, backend, reentrant
):
    """Same curvature, loss and log marginal likelihood with and without checkpointing, to
    rounding in float64, with dropout > 0 in the config (off in both fits); the checkpointed
    fit re-runs the layers (once per backward pass), and every mode is restored afterwards."""
    model, batches = {"llama": _llama_dropout, "gpt2": _gpt2_dropout}[arch]()
    kw = dict(hessian_structure=structure, backend=backend, prior_precision=0.7, seed=3)
    kw["factor_rank"] = rank
    model.train()
    ref = Laplace(model, "causal_lm", **kw).fit(batches)
    if rank is not None:
        assert ref.posterior.block_factors(0)[1].vectors.shape[1] == rank  # sketched
    _enable_checkpointing(model, reentrant)
    funcs = [m._gradient_checkpointing_func for m in C.checkpointing_layers(model)]
    modes, use_cache = _modes(model), model.config.use_cache
    count, handles = _calls_of_checkpointed_layers(model)
    lap = Laplace(model, "causal_lm", **kw).fit(batches)
    for h in handles:
        h.remove()
    n_layers = len(funcs)
    assert count[0] > n_layers * len(batches)  # each forward call once, and re-runs
    torch.testing.assert_close(lap.curvature_dense(), ref.curvature_dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lap.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        lap.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-11, atol=0
    )
    assert _modes(model) == modes and model.config.use_cache == use_cache
    assert [m._gradient_checkpointing_func for m in C.checkpointing_layers(model)] == funcs


@pytest.mark.parametrize("rank", [None, 4], ids=["dense", "factor_rank"])
def test_fit_reruns_each_checkpointed_layer_once_per_backward_pass(one_thread, rank):
    """With ``n_mc_samples=2`` a batch takes one forward and two backward passes: every
    checkpointed layer runs 3 times per batch (once without checkpointing)."""
    model, batches = _llama_dropout()
    _enable_checkpointing(model)
    count, handles = _calls_of_checkpointed_layers(model)
    Laplace(model, "causal_lm", backend="ggn-mc", n_mc_samples=2, seed=0, factor_rank=rank).fit(
        batches
    )
    for h in handles:
        h.remove()
    assert count[0] == len(C.checkpointing_layers(model)) * len(batches) * 3


def test_glm_jacobians_run_checkpointed_and_equal_the_plain_ones(one_thread):
    """The GLM predictive's Jacobians (one backward pass per output) with checkpointing: the
    same Jacobians and predictive, dropout off, the layers re-run once per output."""
    model, batches = bert_lora(num_labels=3, hidden=16, layers=2)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = DROPOUT
    model.train()
    lap = Laplace(model, "classification", prior_precision=0.5).fit(batches)
    x = {k: v for k, v in batches[0].items() if k != "labels"}
    ref_f, ref_J = lap.output_jacobians(x)
    ref_pred = lap(x, pred_type="glm", link_approx="probit")
    _enable_checkpointing(model)
    count, handles = _calls_of_checkpointed_layers(model)
    f, J = lap.output_jacobians(x)
    pred = lap(x, pred_type="glm", link_approx="probit")
    for h in handles:
        h.remove()
    n_layers = len(C.checkpointing_layers(model))
    assert count[0] == 2 * n_layers * (1 + 3)  # two calls, each one forward and 3 backward passes
    torch.testing.assert_close(f, ref_f, rtol=1e-12, atol=1e-14)
    for a, b in zip(J, ref_J):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-13)
    assert model.training


class _DropoutBlock(GradientCheckpointingLayer):
    """A residual block with dropout in its own forward (as BART's or Whisper's layers have):
    the flag that decides checkpointing also decides this dropout."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.lin(nn.functional.dropout(h, DROPOUT, self.training)))


class _Stack(nn.Module):
    def __init__(self, d=5, n_classes=3):
        super().__init__()
        self.blocks = nn.ModuleList([_DropoutBlock(d) for _ in range(2)])
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_dropout_in_a_checkpointed_layers_own_forward_stays_off(one_thread):
    torch.manual_seed(0)
    model = _Stack().to(F64)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))]
    model.train()
    ref = Laplace(model, "classification", hessian_structure="full").fit(batches)
    for block in model.blocks:  # what transformers' gradient_checkpointing_enable() sets
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    assert len(C.checkpointing_layers(model)) == 2
    count, handles = [0], []
    for block in model.blocks:
        handles.append(
            block.lin.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        )
    lap = Laplace(model, "classification", hessian_structure="full").fit(batches)
    for h in handles:
        h.remove()
    assert count[0] == 2 * (1 + 2)  # 3 classes: 2 backward passes (exact GGN)
    torch.testing.assert_close(lap.curvature_dense(), ref.curvature_dense(), rtol=1e-10, atol=1e-13)
    assert all(block.training for block in model.blocks)


def test_trainer_with_gradient_checkpointing_fits_checkpointed(tmp_path, monkeypatch, one_thread):
    """``MargLikTrainer(args.gradient_checkpointing=True)`` on a peft model: the Trainer turns it
    on, and every marginal-likelihood fit finds the checkpointing layers (which the tests above
    show it then re-runs, with the curvature unchanged)."""
    from hf_marglik import MargLikTrainer

    model, _ = _llama_dropout()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 24, (8, 10), generator=g)
    data = DictDataset(
        [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    )
    found = []

    def spy(m):
        layers = checkpointing_layers(m)
        found.append(len(layers))
        return layers

    checkpointing_layers = C.checkpointing_layers
    monkeypatch.setattr(C, "checkpointing_layers", spy)
    args = tiny_trainer_args(
        tmp_path,
        likelihood="causal_lm",
        backend="ggn-mc",
        per_device_train_batch_size=4,
        num_train_epochs=1,
        gradient_checkpointing=True,
        n_hypersteps=1,
    )
    MargLikTrainer(model=model, args=args, train_dataset=data).train()
    assert found and all(n == 2 for n in found)


# ------------------------------------------------------------------------------- memory
def _memory_model():
    """A LLaMA deep and narrow enough, and a batch long enough, that the activations dominate
    a training step: 8 layers of width 64, LoRA r=4 on q_proj and v_proj, batch 4 × 256 tokens,
    float32, no dropout. The vocabulary is 16: the pass keeps the logits, the model's
    probabilities and one loss-Hessian column (each batch × tokens × vocabulary) through its
    backward pass where a training step keeps one, and those are not what checkpointing is for
    (BENCHMARKS.md, "LLM memory and start-up", has SmolLM2's shapes)."""
    model = llama_lora_model(
        hidden=64,
        layers=8,
        heads=4,
        kv_heads=2,
        vocab=16,
        r=4,
        max_positions=256,
        dtype=torch.float32,
    )
    randomise_trainable(model, 0, 0.1)
    ids = torch.randint(0, 16, (4, 256), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _peak(fn) -> int:
    with LiveBytes() as m:
        fn()
    return m.peak


def _training_step(model, batch):
    model.train()
    model(**batch).loss.backward()


def _peaks(model, batch, rank):
    step = _peak(lambda: _training_step(model, batch))
    for p in model.parameters():
        p.grad = None
    lap = Laplace(model, "causal_lm", backend="ggn-mc", seed=0, factor_rank=rank)
    fit = _peak(lambda: lap.fit([batch]))
    return fit, step


@pytest.mark.parametrize("rank", [None, 4], ids=["dense", "factor_rank"])
def test_checkpointed_fit_peak_memory_within_a_training_step(one_thread, rank):
    """Peak bytes of live tensors (:class:`memtrack.LiveBytes`: independent of the allocator,
    the thread count and other processes), Monte-Carlo K-FAC against ``model(**batch).loss
    .backward()`` in train mode, both with checkpointing. Measured: 1.04 (dense) / 1.03
    (factor_rank=4), against 4.0 for a fit without checkpointing."""
    model, batch = _memory_model()
    _enable_checkpointing(model)
    fit, step = _peaks(model, batch, rank)
    assert fit <= MEMORY_RATIO * step, (fit / 2**20, step / 2**20)


def test_memory_check_fails_for_a_fit_without_checkpointing(one_thread, monkeypatch):
    """The measure above tells a pass that drops checkpointing (as eval mode alone does)."""
    model, batch = _memory_model()
    _enable_checkpointing(model)
    monkeypatch.setattr(C, "checkpointing_layers", lambda m: [])
    fit, step = _peaks(model, batch, None)
    assert fit > 2 * step, (fit / 2**20, step / 2**20)


def test_modes_and_checkpoint_functions_are_restored_when_the_fit_raises(one_thread):
    model, batches = _llama_dropout()
    _enable_checkpointing(model)
    model.base_model.model.model.layers[0].eval()  # a mixed state: restored as it was
    modes = _modes(model)
    funcs = [m._gradient_checkpointing_func for m in C.checkpointing_layers(model)]
    bad = [{**batches[0], "labels": batches[0]["labels"].clamp_min(0) + 100}]  # out of range
    with pytest.raises(ValueError, match="Labels must lie"):
        Laplace(model, "causal_lm", backend="ggn-mc").fit(bad)
    assert _modes(model) == modes and model.config.use_cache
    assert [m._gradient_checkpointing_func for m in C.checkpointing_layers(model)] == funcs
