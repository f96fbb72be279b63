"""Synthetic adapter landings with the structure Share assumes: every task's LoRA update lives
in one shared `dim`-dimensional subspace per layer and side (B_j = U_B·G_j, A_jᵀ = U_A·H_j).

Used to grow a workspace to hundreds of tasks quickly (tests, `bench.scale`) without training:
each landing is a real PEFT LoRA directory (written by `peft_io.write_adapter`) plus task.yaml
and eval.jsonl taken from a generated text task, so it goes through the same validation,
absorb and evaluation as an adapter trained elsewhere. With dim ≤ k_max the subspace holds
every task exactly (up to float32 rounding), so a merge moves no old task: the regime in
which a landing's cost must not depend on the history.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import nn

from .layer import in_out_features
from .model import head_tensors, is_target, last_linear
from .peft_io import LoraAdapter, write_adapter
from .taskdata import EVAL_FILE, SPEC_FILE, read_examples, read_task_spec


def _orthonormal(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def shared_subspace_adapters(model: nn.Module, names: list[str], num_labels: int, *, targets: list[str], heads: list[str], base_model_id: str, rank: int = 8, dim: int = 16, scale: float = 2.0, seed: int = 0, first: int = 0) -> list[LoraAdapter]:
    """One LoRA per name on `model`'s `targets`, all inside the same dim-dim subspaces (fixed by
    `seed`); task i (counting from `first`) draws its coefficients from seed + i, so adapters
    made in separate calls are the same as in one call. Heads: the model's head with a fresh
    last Linear of `num_labels` outputs (std 1: confident, well-separated predictions)."""
    layers = {name: in_out_features(mod) for name, mod in model.named_modules() if is_target(name, targets) and isinstance(mod, nn.Linear)}
    g = torch.Generator().manual_seed(seed)
    bases = {name: (_orthonormal(n, dim, g), _orthonormal(d, dim, g)) for name, (d, n) in sorted(layers.items())}
    base_heads = head_tensors(model, heads)
    last = last_linear(model, heads)
    out = []
    for i, name in enumerate(names, start=first):
        gi = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
        factors = {}
        for layer, (u_b, u_a) in bases.items():
            b = u_b @ torch.randn(dim, rank, generator=gi, dtype=torch.float64) * (0.05 / rank**0.5)
            a = u_a @ torch.randn(dim, rank, generator=gi, dtype=torch.float64) * (1.0 / rank**0.5)
            factors[layer] = (b.float(), a.T.float().contiguous())
        h = dict(base_heads)
        d_in = h[f"{last}.weight"].shape[1]
        h[f"{last}.weight"] = torch.randn(num_labels, d_in, generator=gi)
        if f"{last}.bias" in h:
            h[f"{last}.bias"] = torch.zeros(num_labels)
        out.append(LoraAdapter(name=name, rank=rank, lora_alpha=scale * rank, scale=scale, target_modules=list(targets), factors=factors, heads=h, modules_to_save=list(heads), base_model_name=base_model_id))
    return out


def write_landing(root: Path, adapter: LoraAdapter, template: Path, eval_rows: int | None = None) -> Path:
    """<root>/<adapter.name>/: the PEFT LoRA + task.yaml and eval.jsonl of the generated text
    task at `template`, renamed to the adapter (its first `eval_rows` rows); task.yaml last."""
    out = write_adapter(Path(root) / adapter.name, adapter)
    spec = read_task_spec(template / SPEC_FILE)
    rows = read_examples(template / EVAL_FILE, spec)[:eval_rows]
    (out / EVAL_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out / SPEC_FILE).write_text(yaml.safe_dump({**spec.to_yaml_dict(), "name": adapter.name}, sort_keys=False), encoding="utf-8")
    return out
