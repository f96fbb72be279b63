"""PEFT LoRA adapters in and out. The only module that knows PEFT's key names.

On disk a PEFT LoRA is adapter_config.json + adapter_model.safetensors with keys
"base_model.model.<module>.lora_A.weight" (r×d), ".lora_B.weight" (n×r) and, for
modules_to_save (task heads), "base_model.model.<module>.<param>". Pickled
adapter_model.bin files are refused: unpickling an untrusted file runs code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
PREFIX = "base_model.model."
TASK_CARD = "share_task.json"  # written by an export next to the adapter: labels and provenance


class AdapterError(ValueError):
    """An adapter is malformed, unsafe, or does not fit the base model / subspace."""


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: ΔW_layer = scale · B A for every adapted layer."""

    name: str
    rank: int
    lora_alpha: float
    scale: float
    target_modules: list[str]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (B n×r, A r×d)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name: str | None = None
    task_type: str | None = None  # PEFT's task_type (CAUSAL_LM, SEQ_CLS, ...) when the config names one


def _config_scale(cfg: dict, source: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scale) from a PEFT LoRA config, refusing what Share cannot represent."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for key in ("use_dora", "use_qalora"):
        if cfg.get(key):
            raise AdapterError(f"{source}: {key}=true is not a plain LoRA; Share cannot absorb it")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(f"{source}: per-module {key} is not supported (one rank and alpha per adapter)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={cfg.get('bias')!r}; only bias='none' adapters are supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"{source}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterError(f"{source}: lora_alpha must be a positive number, got {alpha!r}")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(alpha), float(scale)


def _target_list(cfg: dict, source: str) -> list[str]:
    t = cfg.get("target_modules")
    if isinstance(t, str):
        raise AdapterError(f"{source}: target_modules is a regex ({t!r}); list the module names instead")
    if not t:
        raise AdapterError(f"{source}: target_modules is empty")
    return sorted(t)


def parse_state_dict(
    sd: dict[str, torch.Tensor], cfg: dict, name: str, source: str, config_source: str | None = None
) -> LoraAdapter:
    """A LoraAdapter from PEFT's saved state-dict keys and config, with every check. Errors
    about the tensors name `source`, about the config `config_source` (default: `source`)."""
    config_source = config_source or source
    r, alpha, scale = _config_scale(cfg, config_source)
    heads_modules = sorted(cfg.get("modules_to_save") or [])
    a_side, b_side, heads = {}, {}, {}
    for key, t in sd.items():
        if not key.startswith(PREFIX) or ".." in key:
            raise AdapterError(f"{source}: unexpected key {key!r} (expected the prefix {PREFIX!r})")
        rel = key[len(PREFIX) :]
        if not torch.is_floating_point(t) or not torch.isfinite(t).all():
            raise AdapterError(f"{source}: tensor {key} has NaN/Inf or is not floating point")
        if rel.endswith(".lora_A.weight"):
            a_side[rel[: -len(".lora_A.weight")]] = t
        elif rel.endswith(".lora_B.weight"):
            b_side[rel[: -len(".lora_B.weight")]] = t
        elif any(rel == m or rel.startswith(m + ".") or f".{m}." in f".{rel}" for m in heads_modules):
            heads[rel] = t
        else:
            raise AdapterError(f"{source}: key {key!r} is neither a LoRA factor nor in modules_to_save {heads_modules}")
    # PEFT's task types add their usual head names (SEQ_CLS: classifier and score, whichever the model has, and
    # repeats one a user also named): the heads are the listed modules whose tensors were saved
    saved = [
        m
        for m in dict.fromkeys(heads_modules)
        if any(r == m or r.startswith(m + ".") or f".{m}." in f".{r}" for r in heads)
    ]
    heads_modules = saved if heads else heads_modules
    if set(a_side) != set(b_side):
        raise AdapterError(f"{source}: lora_A/lora_B pairs incomplete for {sorted(set(a_side) ^ set(b_side))}")
    if not a_side:
        raise AdapterError(f"{source}: no LoRA factors found")
    factors = {}
    for layer in sorted(a_side):
        b, a = b_side[layer], a_side[layer]
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != r or a.shape[0] != r:
            raise AdapterError(
                f"{source}: layer {layer}: B {tuple(b.shape)} and A {tuple(a.shape)} do not have rank r={r}"
            )
        factors[layer] = (b.float(), a.float())
    return LoraAdapter(
        name=name,
        rank=r,
        lora_alpha=alpha,
        scale=scale,
        target_modules=_target_list(cfg, config_source),
        factors=factors,
        heads={k: v.float() for k, v in heads.items()},
        modules_to_save=heads_modules,
        base_model_name=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type") if isinstance(cfg.get("task_type"), str) else None,
    )


def read_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory safely (safetensors only) and validate it completely.
    Errors name the adapter's files by name (adapter_config.json, adapter_model.safetensors),
    never by the directory they were read from (often a worker's temp dir)."""
    path = Path(path)
    name = name or path.name
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    pickles = [p for p in PICKLE_FILES if (path / p).exists()]
    if pickles and not w_path.exists():
        raise AdapterError(
            f"{pickles[0]}: pickle weights are refused (unsafe to load); save the adapter as safetensors"
        )
    if not cfg_path.is_file():
        raise AdapterError(f"{CONFIG_FILE}: missing")
    if not w_path.is_file():
        raise AdapterError(f"{WEIGHTS_FILE}: missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{CONFIG_FILE}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE}: expected a JSON object")
    try:
        sd = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(
            f"{WEIGHTS_FILE}: corrupt or unreadable safetensors ({str(e).replace(str(path), '')[:200]})"
        ) from None
    return parse_state_dict(sd, cfg, name, WEIGHTS_FILE, config_source=CONFIG_FILE)


def adapter_from_peft_model(peft_model, name: str, adapter_name: str = "default") -> LoraAdapter:
    """The LoRA trained in a live PeftModel, through PEFT's own state-dict export."""
    cfg = peft_model.peft_config[adapter_name].to_dict()
    cfg["peft_type"] = "LORA"
    cfg["target_modules"] = sorted(cfg["target_modules"])
    sd = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    return parse_state_dict(sd, cfg, name, f"PeftModel[{adapter_name}]")


def write_adapter(
    path: str | os.PathLike, adapter: LoraAdapter, fan_in_fan_out: bool = False, extra: dict[str, str] | None = None
) -> Path:
    """Write `adapter` as a standard PEFT LoRA directory (atomically: temp dir + rename); its
    task_type is recorded when known (PeftModel.from_pretrained then builds the right class)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    alpha = adapter.lora_alpha
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=sorted(adapter.target_modules),
        modules_to_save=sorted(adapter.modules_to_save) or None,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=adapter.base_model_name,
        task_type=adapter.task_type,
    )
    sd = {}
    for layer, (b, a) in adapter.factors.items():
        sd[f"{PREFIX}{layer}.lora_A.weight"] = a.detach().cpu().contiguous()
        sd[f"{PREFIX}{layer}.lora_B.weight"] = b.detach().cpu().contiguous()
    for key, h in adapter.heads.items():
        sd[f"{PREFIX}{key}"] = h.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(sd, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for name, text in (extra or {}).items():  # files that travel with the adapter (e.g. TASK_CARD)
            (tmp / name).write_text(text)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
