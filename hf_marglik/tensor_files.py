"""Nested data with tensors as two plain files: the tensors in a safetensors file under dotted
keys, everything else in JSON (no pickle).

:func:`split_tensors` walks dicts, lists and tuples and replaces each tensor by a reference
``{"__tensor__": key}`` (``key`` the dotted path of its first occurrence, e.g.
``"posterior.factors.0.1"``); a tensor object that occurs twice is stored once and both places
name the same key, so :func:`join_tensors` gives them back as one tensor (shared, as they were).
Every stored tensor is a contiguous CPU copy: safetensors refuses tensors that share memory.
Tuples come back as lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import atomic_write, save_json

TENSOR_REF = "__tensor__"
"""The key of a reference to a stored tensor in the JSON skeleton."""


def split_tensors(obj, prefix: str = "") -> tuple[object, dict[str, Tensor]]:
    """``(skeleton, tensors)``: ``obj`` with every tensor replaced by a reference to its key in
    ``tensors`` (dotted paths below ``prefix``)."""
    tensors: dict[str, Tensor] = {}
    seen: dict[int, str] = {}

    def walk(x, path: str):
        if isinstance(x, Tensor):
            if id(x) not in seen:
                seen[id(x)] = path
                tensors[path] = x.detach().cpu().clone(memory_format=torch.contiguous_format)
            return {TENSOR_REF: seen[id(x)]}
        if isinstance(x, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]
        return x

    return walk(obj, prefix), tensors


def join_tensors(skeleton, tensors: dict[str, Tensor]):
    """The inverse of :func:`split_tensors`: each reference replaced by its tensor (a missing
    key is a ``KeyError`` naming it)."""

    def walk(x):
        if isinstance(x, dict):
            if set(x) == {TENSOR_REF}:
                key = x[TENSOR_REF]
                if key not in tensors:
                    raise KeyError(f"tensor {key!r} is missing from the tensor file")
                return tensors[key]
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata=None) -> None:
    """``tensors`` as a safetensors file at ``path``, atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device="cpu") -> dict[str, Tensor]:
    """The tensors of the safetensors file at ``path``."""
    from safetensors.torch import load_file

    return load_file(os.fspath(path), device=str(device))


def save_tree(obj, tensors_path: str | os.PathLike, json_path: str | os.PathLike) -> None:
    """``obj`` (nested dicts / lists of tensors and JSON values) as a safetensors file and a JSON
    file (its skeleton), each written atomically, the JSON last."""
    skeleton, tensors = split_tensors(obj)
    save_tensors(tensors, tensors_path)
    save_json(skeleton, json_path)


def load_tree(tensors_path: str | os.PathLike, json_path: str | os.PathLike):
    """What :func:`save_tree` wrote."""
    skeleton = json.loads(Path(json_path).read_text())
    return join_tensors(skeleton, load_tensors(tensors_path))
