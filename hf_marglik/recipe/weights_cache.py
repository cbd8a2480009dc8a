"""A cache of the float32 weights dequantised from a GGUF file, with its config and tokenizer.

Dequantising the bundled SmolLM2 GGUF file (``from_pretrained(folder, gguf_file=...)``) takes
about 20 s on every start. The first load writes the float32 model (``save_pretrained``:
safetensors and ``config.json``) and the tokenizer read from the GGUF file to a cache folder;
later starts read those (:func:`cached_gguf`).

Where: ``$HF_MARGLIK_CACHE`` (``off`` disables the cache), else
``$XDG_CACHE_HOME/hf_marglik`` or ``~/.cache/hf_marglik``; one folder per GGUF file, named
after it and a key of its resolved path, size and modification time (a changed file gets a new
folder), with ``-float32`` (the dtype stored; ``model_dtype`` is applied when loading).

Written atomically: the folder is built under a temporary name beside it, the manifest
(:data:`MANIFEST`: every file's size and SHA-256) is written last and the folder is renamed
into place, so a process killed mid-write leaves no folder that could be taken for a cache.
Validated before use: a folder whose manifest is missing or unreadable, or whose files are
missing, of another size or (weights included before the weights are loaded) of another
SHA-256, is not trusted: it is rebuilt from the GGUF file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

ENV = "HF_MARGLIK_CACHE"
MANIFEST = "hf_marglik_cache.json"
FORMAT = 1
DTYPE = "float32"
_OFF = ("off", "0", "false", "no", "none")
_CHUNK = 1 << 22


def cache_root() -> Path | None:
    """The cache's root folder (None when ``$HF_MARGLIK_CACHE`` turns it off)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "hf_marglik"


def cache_folder(folder: str | Path, gguf_file: str) -> Path | None:
    """The cache folder of ``folder/gguf_file`` (None when the cache is off)."""
    root = cache_root()
    if root is None:
        return None
    f = Path(folder) / gguf_file
    st = f.stat()
    ident = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return root / f"{Path(gguf_file).stem}-{key}-{DTYPE}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin"))


def is_valid(folder: Path, weights: bool = True) -> bool:
    """Whether ``folder`` is a complete cache: its manifest lists every file with its size and
    SHA-256, and they match (the hashes of the weight files only with ``weights``; their sizes
    always)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not files:
            return False
        if not any(_is_weights(n) for n in files) or "config.json" not in files:
            return False
        for name, meta in files.items():
            path = folder / name
            if Path(name).name != name or path.stat().st_size != meta["size"]:
                return False
            if (weights or not _is_weights(name)) and _sha256(path) != meta["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def dequantise(folder: str | Path, gguf_file: str):
    """The causal-LM model in ``folder/gguf_file`` with its weights unpacked to dense float32,
    as a plain model (no quantization config: transformers refuses to save a GGUF-loaded one),
    and the tokenizer stored in the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    loaded = AutoModelForCausalLM.from_pretrained(
        str(folder),
        gguf_file=gguf_file,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    return model, tokenizer


def build(folder: str | Path, gguf_file: str, target: Path) -> Path:
    """Write the cache of ``folder/gguf_file`` to ``target`` atomically (see the module
    docstring); an invalid ``target`` is replaced, a valid one (another process was faster)
    kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model, tokenizer = dequantise(folder, gguf_file)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        src = Path(folder) / gguf_file
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "dtype": DTYPE,
            "source": {"path": str(src.resolve()), "size": src.stat().st_size},
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        if is_valid(target):
            return  # built meanwhile by another process
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_valid(target):  # lost a race to a writer whose folder is not valid
            raise


def cached_gguf(folder: str | Path, gguf_file: str, build_missing: bool = True) -> Path | None:
    """The valid cache folder of ``folder/gguf_file`` (weights checked with ``build_missing``),
    built first when missing or invalid and ``build_missing``. None when the cache is off, or
    missing and not to be built, or could not be written (with a warning: the caller loads from
    the GGUF file)."""
    target = cache_folder(folder, gguf_file)
    if target is None:
        return None
    if is_valid(target, weights=build_missing):
        return target
    if not build_missing:
        return None
    try:
        return build(folder, gguf_file, target)
    except OSError as e:
        warnings.warn(
            f"Could not write the weights cache {target} ({e}); loading from the GGUF file. Set "
            f"{ENV} to a writable folder, or to 'off'.",
            stacklevel=2,
        )
        return None
