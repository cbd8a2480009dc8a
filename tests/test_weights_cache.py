"""The float32 weights cache of GGUF models (hf_marglik/recipe/weights_cache.py).

Dequantising a real GGUF file takes about 20 s, so here ``weights_cache.dequantise`` returns a
tiny random LLaMA and a word-level tokenizer, and the "GGUF file" is a few bytes that name it
(the cache is keyed by the file's path, size and modification time). The cache is built once,
then read (also through ``load_source`` / ``build_model``); a cache that is corrupt (weights of
the right size, other bytes), truncated, without manifest, or left half-written by a failed
build is detected and rebuilt, never loaded. The real file: benchmarks/bench_llm_memory.py
(``--startup``) loads SmolLM2 both ways and checks that weights, config and tokenizer agree.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_marglik.recipe import models as M
from hf_marglik.recipe import weights_cache as W
from hf_marglik.recipe.arguments import LoraArguments, ModelArguments


def _tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=12,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(10)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<pad>")
    return LlamaForCausalLM(cfg), tok


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A folder with a stand-in GGUF file, the cache under tmp_path, and a counter of the
    dequantisations (with the reference weights of the last one)."""
    monkeypatch.setenv(W.ENV, str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF stand-in")
    calls = {"n": 0, "state": None}

    def dequantise(path, name):
        assert (path, name) == (str(folder), "tiny.gguf")
        calls["n"] += 1
        model, tok = _tiny()
        calls["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, tok

    monkeypatch.setattr(W, "dequantise", dequantise)
    return folder, calls


def _weights(folder):
    return next(p for p in folder.iterdir() if p.suffix == ".safetensors")


def test_built_once_then_read(gguf):
    from transformers import AutoModelForCausalLM

    folder, calls = gguf
    cache = W.cached_gguf(str(folder), "tiny.gguf")
    assert calls["n"] == 1 and cache == W.cache_folder(str(folder), "tiny.gguf")
    assert cache.name.startswith("tiny-") and cache.name.endswith("-float32")
    manifest = json.loads((cache / W.MANIFEST).read_text())
    assert {"config.json", _weights(cache).name, "tokenizer.json"} <= set(manifest["files"])
    assert W.is_valid(cache)
    assert W.cached_gguf(str(folder), "tiny.gguf") == cache and calls["n"] == 1
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, calls["state"][k], rtol=0, atol=0)
    # nothing else was left beside it (no temporary folders)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_load_source_and_build_model_read_the_cache(gguf):
    folder, calls = gguf
    args = ModelArguments(model_name_or_path=str(folder), gguf_file="tiny.gguf", task="causal_lm")
    W.cached_gguf(str(folder), "tiny.gguf")
    source = M.load_source(args)  # the stand-in is no GGUF file: only the cache can be read
    assert source.cache == str(W.cache_folder(str(folder), "tiny.gguf"))
    assert source.tokenizer("w1 w2")["input_ids"] == [3, 4]
    assert source.max_length == 64
    model = M.build_model(args, LoraArguments(use_lora=False), source, None)
    assert calls["n"] == 1
    sd = model.state_dict()
    for k, v in calls["state"].items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", ["flipped-byte", "truncated", "no-manifest", "bad-manifest", "missing-file"]
)
def test_a_damaged_cache_is_rebuilt_not_loaded(gguf, damage):
    folder, calls = gguf
    cache = W.cached_gguf(str(folder), "tiny.gguf")
    weights = _weights(cache)
    if damage == "flipped-byte":
        _flip_a_byte(weights)  # same size: only the hash tells
        assert W.is_valid(cache, weights=False) and not W.is_valid(cache)
    elif damage == "truncated":
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    elif damage == "no-manifest":
        (cache / W.MANIFEST).unlink()
    elif damage == "bad-manifest":
        (cache / W.MANIFEST).write_text('{"format": 1, "files": ')
    else:
        (cache / "tokenizer.json").unlink()
    assert not W.is_valid(cache)
    args = ModelArguments(model_name_or_path=str(folder), gguf_file="tiny.gguf", task="causal_lm")
    if damage == "flipped-byte":  # config and tokenizer still read from the cache
        source = M.load_source(args)
        model = M.build_model(args, LoraArguments(use_lora=False), source, None)
        for k, v in calls["state"].items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    else:
        assert W.cached_gguf(str(folder), "tiny.gguf", build_missing=False) is None
        W.cached_gguf(str(folder), "tiny.gguf")
    assert calls["n"] == 2 and W.is_valid(cache)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_a_failed_build_leaves_no_cache(gguf, monkeypatch):
    folder, calls = gguf
    from transformers import PreTrainedModel

    def killed(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed)
    with pytest.warns(UserWarning, match="Could not write the weights cache"):
        assert W.cached_gguf(str(folder), "tiny.gguf") is None
    target = W.cache_folder(str(folder), "tiny.gguf")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_changed_gguf_file_gets_a_new_cache(gguf):
    folder, _ = gguf
    first = W.cache_folder(str(folder), "tiny.gguf")
    st = (folder / "tiny.gguf").stat()
    os.utime(folder / "tiny.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert W.cache_folder(str(folder), "tiny.gguf") != first


def test_the_cache_can_be_turned_off(gguf, monkeypatch):
    folder, calls = gguf
    monkeypatch.setenv(W.ENV, "off")
    assert W.cache_root() is None and W.cached_gguf(str(folder), "tiny.gguf") is None
    assert calls["n"] == 0
