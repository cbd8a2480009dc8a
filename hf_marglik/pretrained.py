"""A fitted :class:`~hf_marglik.Laplace` as a folder of two plain files, like a peft adapter:
:data:`TENSORS_NAME` (safetensors: the tensors of ``Laplace.state_dict()`` under dotted keys)
and :data:`CONFIG_NAME` (JSON: everything else, readable). No pickle: a posterior can be shared
on the Hugging Face Hub and loaded without running its author's code.

The tensors: ``prior_precision``, ``predictive_prior_precision`` (when set; ``inf`` everywhere
for the MAP's predictive), ``prior_mean`` (a 0-d tensor, or one value per parameter),
``sigma_noise``, ``loss``, ``mean`` (the MAP), and ``posterior.*``: the curvature in its
structure's stored form (``posterior.H`` for ``diag`` / ``full``; for ``kron`` the
eigenvalues and eigenvectors of each factor, ``posterior.factors.<i>.0`` / ``.1``, a factor
shared by several blocks stored once).

The config: ``format_version``, ``likelihood``, ``hessian_structure``, ``backend``,
``kfac_approx``, ``temperature``, ``subset_of_weights``, ``predictive_subset_of_weights``,
``prior_structure``, ``predictive_prior`` (null, or its structure and whether it is the point
mass), ``prior_mean`` (``"zero"``, ``"scalar"`` or ``"per_parameter"``), ``sigma_noise``,
``n_data``, ``n_outputs``, ``dtype``, ``options`` (the constructor options a fit needs again:
batch keys, Monte-Carlo samples, batched columns), ``parameters`` (name and shape of every
tensor the posterior is over, in ``named_parameters()`` order) and ``posterior`` (the
structure's non-tensor entries, e.g. which factors form each K-FAC block, with references
``{"__tensor__": key}`` into the tensor file). The readable copies of ``sigma_noise`` and
``prior_mean`` are informative; loading takes the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import save_json
from .tensor_files import join_tensors, load_tensors, save_tensors, split_tensors

TENSORS_NAME = "laplace_posterior.safetensors"
"""The posterior's tensors in a :meth:`Laplace.save_pretrained` folder."""
CONFIG_NAME = "laplace_config.json"
"""The posterior's settings and layout in a :meth:`Laplace.save_pretrained` folder."""
LEGACY_NAME = "laplace_posterior.pt"
"""The pickle-based file of ``Laplace.save`` (deprecated; :meth:`Laplace.load` still reads it)."""
FORMAT_VERSION = 1

_TENSOR_KEYS = (
    "prior_precision",
    "predictive_prior_precision",
    "prior_mean",
    "sigma_noise",
    "loss",
    "mean",
)
_PLAIN_KEYS = (
    "likelihood",
    "hessian_structure",
    "backend",
    "kfac_approx",
    "temperature",
    "subset_of_weights",
    "predictive_subset_of_weights",
    "n_data",
    "n_outputs",
)


def options(lap) -> dict:
    """The constructor options beyond the state dict that a loaded Laplace keeps."""
    return {
        "dict_key_x": lap.dict_key_x,
        "dict_key_y": lap.dict_key_y,
        "n_mc_samples": lap.n_mc_samples,
        "batch_columns": lap.batch_columns,
    }


def save_pretrained(lap, folder: str | os.PathLike) -> None:
    """Write ``lap``'s posterior to ``folder`` (created if needed): :data:`TENSORS_NAME`, then
    :data:`CONFIG_NAME`, each atomically (a temporary file moved into place), so a folder with
    the config holds the tensors it names."""
    sd = lap.state_dict()
    tensors = {k: sd[k] for k in _TENSOR_KEYS if sd[k] is not None}
    skeleton, stored = split_tensors({**tensors, "posterior": sd["posterior"]})
    predictive = lap.predictive_prior_precision
    config = {
        "format": "hf_marglik.Laplace",
        "format_version": FORMAT_VERSION,
        **{k: sd[k] for k in _PLAIN_KEYS},
        "prior_structure": lap.prior_structure.value,
        "predictive_prior": None
        if predictive is None
        else {
            "structure": lap.predictive_prior.structure.value,
            "point_mass": lap.predictive_prior.is_point_mass,
        },
        "prior_mean": _prior_mean_kind(lap.prior_mean),
        "sigma_noise": float(lap.sigma_noise),
        "dtype": str(lap.dtype).removeprefix("torch."),
        "options": options(lap),
        "parameters": [
            {"name": n, "shape": list(p.shape)} for n, p in zip(lap.param_names, lap.params)
        ],
        "posterior": skeleton["posterior"],
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(stored, folder / TENSORS_NAME, metadata={"format": "pt"})
    save_json(config, folder / CONFIG_NAME)


def _prior_mean_kind(mu) -> str:
    if not isinstance(mu, float):
        return "per_parameter"
    return "zero" if mu == 0.0 else "scalar"


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of ``name_or_path``: a folder as it is; otherwise a Hugging Face Hub
    repository id, downloaded (the two posterior files only) with
    ``huggingface_hub.snapshot_download``."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_file():
        raise ValueError(
            f"{path} is a file; Laplace.from_pretrained takes the folder save_pretrained wrote "
            f"({CONFIG_NAME} and {TENSORS_NAME}). A .pt posterior loads with Laplace.load "
            "(deprecated; convert it with scripts/convert_posterior.py)."
        )
    name = os.fspath(name_or_path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"No folder {name!r}; a Hugging Face Hub repository id has the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(name, revision=revision, allow_patterns=[CONFIG_NAME, TENSORS_NAME])
    )


def read(folder: Path) -> tuple[dict, dict]:
    """``(config, tensors)`` of a :func:`save_pretrained` folder (tensors on the CPU)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        legacy = folder / LEGACY_NAME
        hint = (
            f" It holds {LEGACY_NAME}, the deprecated format: Laplace.load reads it, "
            "scripts/convert_posterior.py converts it."
            if legacy.is_file()
            else ""
        )
        raise FileNotFoundError(f"{config_path} is missing: no saved posterior in {folder}.{hint}")
    config = json.loads(config_path.read_text())
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version={version!r}; this hf_marglik reads up to "
            f"{FORMAT_VERSION}: upgrade hf_marglik."
        )
    return config, load_tensors(folder / TENSORS_NAME)


def state_dict(config: dict, tensors: dict) -> dict:
    """The ``Laplace.state_dict()`` that :func:`save_pretrained` split into ``config`` and
    ``tensors``."""
    sd = {k: config[k] for k in _PLAIN_KEYS}
    sd.update({k: tensors.get(k) for k in _TENSOR_KEYS})
    sd["param_names"] = [p["name"] for p in config["parameters"]]
    sd["posterior"] = join_tensors(config["posterior"], tensors)
    return sd


def check_parameters(config: dict, lap, folder) -> None:
    """The posterior's tensors must be ``lap``'s (the model's trainable tensors, or their
    subset): the same names in the same order, then the same shapes. A ``ValueError`` names the
    first difference."""
    saved = [(p["name"], tuple(p["shape"])) for p in config["parameters"]]
    model = [(n, tuple(p.shape)) for n, p in zip(lap.param_names, lap.params)]
    names_saved, names_model = [n for n, _ in saved], [n for n, _ in model]
    if names_saved != names_model:
        for i, (a, b) in enumerate(zip(names_saved, names_model)):
            if a != b:
                what = f"tensor {i} is {a!r} in the posterior and {b!r} in the model"
                break
        else:
            i = min(len(names_saved), len(names_model))
            what = (
                f"the posterior has {names_saved[i]!r} (tensor {i}), the model has no more"
                if len(names_saved) > len(names_model)
                else f"the model has {names_model[i]!r} (tensor {i}), the posterior has no more"
            )
        raise ValueError(
            f"The posterior in {folder} was saved for other trainable parameters ("
            f"{config['subset_of_weights']!r} of {len(names_saved)} tensors; the model has "
            f"{len(names_model)}): {what}. Load it over the model it was fitted on, with the "
            "same adapters trainable (peft: is_trainable=True)."
        )
    for (name, a), (_, b) in zip(saved, model):
        if a != b:
            raise ValueError(
                f"The posterior in {folder} does not fit the model: tensor {name!r} has shape "
                f"{list(a)} in the posterior and {list(b)} in the model (a different LoRA rank "
                "or base model?)."
            )
