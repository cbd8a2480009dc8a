"""optuna, the optional backend of ``MargLikTrainer.hyperparameter_search`` (the ``search``
extra: ``pip install hf_marglik[search]``)."""

from __future__ import annotations


def require_optuna():
    """The ``optuna`` module, or an ``ImportError`` that names the extra to install."""
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "hyperparameter_search needs optuna: pip install hf_marglik[search] (or pip install "
            "optuna)."
        ) from None
    return optuna
