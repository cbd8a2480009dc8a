"""QLoRA: LoRA on a bitsandbytes 4-bit (and 8-bit) base, with the curvature over the LoRA
factors only.

A tiny random Llama is saved and loaded back through ``from_pretrained`` with a
``BitsAndBytesConfig`` on the CPU (bitsandbytes 0.50 runs 4-bit and 8-bit layers there), made
ready by peft's ``prepare_model_for_kbit_training`` and given LoRA on ``q_proj`` / ``v_proj``.
Its reference is the float32 model whose linear weights are the 4-bit weights dequantised
(``bitsandbytes.functional.dequantize_4bit``) with the same LoRA factors: on the CPU a 4-bit
layer computes exactly that (dequantise to ``compute_dtype``, then a float32 matmul), so the
two compute the same function and every curvature quantity must agree to float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from models import (  # noqa: E402
    DictDataset,
    dequantised_4bit,
    dequantised_twin,
    kbit_llama_lora,
    tiny_llama_folder,
    tiny_trainer_args,
)

from hf_marglik import Laplace, MargLikTrainer  # noqa: E402
from hf_marglik.quantization import kbit_layers, keep_4bit_differentiable  # noqa: E402
from hf_marglik.recipe.answer_token import AnswerTokenClassifier  # noqa: E402

VOCAB, CLASS_IDS = 32, [3, 5, 7]
TARGETS = ("q_proj", "v_proj")
RTOL = 1e-4
"""Float32 rounding, with room. With bitsandbytes 0.50.2 on this CPU the two models agree bit
for bit (its 4-bit matmul dequantises the weight and calls the same float32 matmul), but a
fused 4-bit kernel (another version, another CPU, a GPU) may sum in another order: a relative
error of a few float32 epsilons (1.2e-7) per layer output, which the softmax's ``p(1-p)``
factors, the Kronecker factors' eigendecompositions and the log-determinant can grow to
~1e-5. A 4-bit model compared with its float original differs by the quantisation error,
~1e-1 relative (the test fails then)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random float32 Llama saved with ``save_pretrained``."""
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"), vocab=VOCAB)


def kbit_model(folder, bits: int = 4, quant_type: str = "nf4") -> nn.Module:
    return kbit_llama_lora(folder, bits, quant_type, targets=TARGETS)


def _batches(n_batches: int = 2, batch: int = 4, seq: int = 6, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -2:] = 0  # right padding in one row
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": torch.randint(0, len(CLASS_IDS), (batch,), generator=g),
            }
        )
    return out


def _fit(model: nn.Module, batches: list[dict]) -> Laplace:
    lap = Laplace(
        AnswerTokenClassifier(model, CLASS_IDS),
        "classification",
        backend="ggn",
        prior_precision=1.0,
    )
    return lap.fit(batches)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    err = float((a - b).abs().max() / scale)
    assert err < RTOL, f"{what}: max error {err:.2e} relative to the largest entry"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_curvature_equals_that_of_the_dequantised_model(folder, quant_type):
    """Exact GGN, K-FAC over the LoRA factors of a 4-bit model: every Kronecker factor, the log
    marginal likelihood (at three prior precisions) and the GLM predictive's Jacobians and
    probabilities equal the float32 model with the dequantised weights, to float32 rounding.
    The sites are the LoRA factors' plain ``nn.Linear`` layers only."""
    qmodel = kbit_model(folder, quant_type=quant_type)
    assert len(kbit_layers(qmodel)) == 14  # 7 linear layers per block, 2 blocks; lm_head float
    ref = dequantised_twin(folder, qmodel)
    batches = _batches()
    lq, lr = _fit(qmodel, batches), _fit(ref, batches)

    assert [s.name.rsplit(".", 2)[-2] for s in lq.sites] == ["lora_A", "lora_B"] * 4
    assert all(type(s.module) is nn.Linear for s in lq.sites)
    assert lq.param_names == lr.param_names and lq.dtype == torch.float32
    for (bq, aq), (br, ar), name in zip(lq.kron_factors(), lr.kron_factors(), lq.param_names):
        assert torch.isfinite(bq).all() and torch.isfinite(aq).all()
        _close(bq, br, f"B of {name}")
        _close(aq, ar, f"A of {name}")
    for prec in (0.1, 1.0, 10.0):
        mq = lq.log_marginal_likelihood(torch.tensor([prec]))
        mr = lr.log_marginal_likelihood(torch.tensor([prec]))
        assert math.isfinite(float(mq))
        assert abs(float(mq - mr)) < RTOL * abs(float(mr)), (prec, float(mq), float(mr))

    x = batches[0]
    (fq, jq), (fr, jr) = lq.output_jacobians(x), lr.output_jacobians(x)
    _close(fq, fr, "logits")
    for a, b, name in zip(jq, jr, lq.param_names):
        _close(a, b, f"Jacobian in {name}")
    _close(lq(x), lr(x), "GLM probit predictive")


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor of ``model``, with each 4-bit layer as its dequantised weight."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for name, layer in kbit_layers(model):
        if isinstance(layer, bnb.nn.Linear4bit):
            state[name + "#dequantised"] = dequantised_4bit(layer).clone()
    return state


@pytest.mark.parametrize("bits", [4, 8])
def test_marglik_trainer_trains_lora_on_a_kbit_base(folder, tmp_path, bits):
    """A few MargLikTrainer steps (exact GGN, a fit and hyper-steps after each epoch, an
    evaluation after each epoch): the LoRA factors move, the quantised base and every other
    frozen tensor stay bit for bit, the curvature and the marginal likelihood are finite."""
    model = kbit_model(folder, bits)
    g = torch.Generator().manual_seed(3)
    items = []
    for _ in range(16):
        ids = torch.randint(0, VOCAB, (6,), generator=g)
        items.append({"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long),
                      "labels": ids.clone()})  # fmt: skip
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = _base_state(model)
    args = tiny_trainer_args(
        tmp_path, likelihood="causal_lm", num_train_epochs=2, n_epochs_burnin=0,
        eval_strategy="epoch", remove_unused_columns=False,
    )  # fmt: skip
    trainer = MargLikTrainer(
        model=model, args=args, train_dataset=DictDataset(items), eval_dataset=DictDataset(items)
    )
    trainer.train()

    assert len(lora_before) == 8
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), lora_before[name]), f"{name} did not move"
    base_after = _base_state(model)
    assert base_after.keys() == base_before.keys()
    for name, before in base_before.items():
        assert torch.equal(base_after[name], before), f"{name} changed"
    lap = trainer.laplace
    assert lap.param_names == list(lora_before)
    assert all(torch.isfinite(b).all() and torch.isfinite(a).all() for b, a in lap.kron_factors())
    assert len(trainer.margliks) >= 2 and all(math.isfinite(m) for m in trainer.margliks)


def _lora_grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_an_eval_forward_leaves_the_4bit_layers_differentiable(folder):
    """bitsandbytes repacks a CPU 4-bit weight for a bfloat16 inference kernel without
    gradients at its first eval-mode forward (on CPUs with AVX512-BF16, this machine's);
    :func:`keep_4bit_differentiable` (called by Laplace, MargLikTrainer and the recipe) turns
    that off: the training gradients after an eval pass equal those before, bit for bit. (On a
    CPU without AVX512-BF16 bitsandbytes never repacks and this holds anyway.)"""
    model = kbit_model(folder)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": ids}
    before = _lora_grads(model, batch)
    keep_4bit_differentiable(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = _lora_grads(model, batch)
    for name, g in before.items():
        assert after[name] is not None, f"{name} got no gradient after an eval forward"
        assert torch.equal(after[name], g), name


# ---------------------------------------------------------------- the recipe (scripts/train.py)
def _train_script():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_script", root / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, root / "configs"


TINY_RUN = [
    "--tiny_random_model", "true",
    "--max_train_samples", "8",
    "--max_eval_samples", "8",
    "--max_test_samples", "4",
    "--max_seq_length", "32",
    "--num_train_epochs", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


def test_4bit_answer_token_config_tiny_marglik_run(tmp_path, monkeypatch):
    """configs/smollm2_answer_token_4bit.yaml with a tiny random Llama: the base is quantised
    through a temporary float folder, the run trains, fits, evaluates and saves; its posterior
    loads back onto the adapter rebuilt on a 4-bit base (``load_trained``)."""
    import json

    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.run import load_trained, prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, configs = _train_script()
    out = tmp_path / "out"
    args = ["--config", str(configs / "smollm2_answer_token_4bit.yaml"), "--marglik", *TINY_RUN]
    assert train.main([*args, "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "(4-bit nf4 base, float32 compute" in metrics["model"]
    assert metrics["trainable_parameters"] == 3584  # LoRA r=8 on q_proj, v_proj of 2 layers
    assert 0.0 <= metrics["test_laplace"]["ece"] <= 1.0
    assert math.isfinite(metrics["marglik"]["log_marglik_best"])

    cfg = parse_args([*args, "--output_dir", str(out)])
    model, lap = load_trained(cfg, prepare(cfg), out)
    assert len([m for _, m in kbit_layers(model) if isinstance(m, bnb.nn.Linear4bit)]) == 14
    assert lap.n_params == 3584 and math.isfinite(float(lap.log_marginal_likelihood()))


QLORA_BAD = {
    "both_4_and_8_bits": (["--load_in_4bit", "true", "--load_in_8bit", "true"],
                          ["load_in_4bit and load_in_8bit", "choose one"]),
    "kbit_without_lora": (["--load_in_8bit", "true", "--use_lora", "false"],
                          ["load_in_8bit needs use_lora: true"]),
    "bad_quant_type": (["--load_in_4bit", "true", "--bnb_4bit_quant_type", "int4"],
                       ["bnb_4bit_quant_type", "'int4'"]),
    "bad_compute_dtype": (["--load_in_4bit", "true", "--bnb_4bit_compute_dtype", "float64"],
                          ["bnb_4bit_compute_dtype='float64'", "float32, bfloat16, float16"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(QLORA_BAD))
def test_bad_quantisation_settings_give_clear_errors(case, tmp_path, capsys):
    args, expected = QLORA_BAD[case]
    train, _ = _train_script()
    out = tmp_path / "out"
    assert train.main([*args, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error:")
    for piece in expected:
        assert piece in err, (piece, err)
    assert not out.exists()


def test_kbit_without_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    from hf_marglik.recipe.arguments import LoraArguments, ModelArguments
    from hf_marglik.recipe.errors import RecipeError
    from hf_marglik.recipe.models import check_quantization

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a)
    )
    with pytest.raises(RecipeError, match=r"pip install hf_marglik\[qlora\]"):
        check_quantization(ModelArguments(load_in_4bit=True), LoraArguments())
    check_quantization(ModelArguments(), LoraArguments())  # a float base needs nothing
