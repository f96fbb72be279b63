"""SubspaceState: everything a version holds, and its atomic, validated save/load.

A version directory (DESIGN §5):
    manifest.json                 base model id+hash, target/head modules, k/p/φ per layer,
                                  ordered tasks, parent, sha256 of every file, content hash
    basis.safetensors             "<layer>.beta" (n×k_B), "<layer>.alpha" (d×k_A)
    tasks/<name>.safetensors      "coef_b.<layer>" (k_B×p), "coef_a.<layer>" (k_A×p), "head.<key>"
The content hash covers the manifest and, through the file hashes, every tensor byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .subspace import KPolicy

FORMAT = "share-subspace/1"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VersionError(ValueError):
    """A version directory is missing, corrupt, tampered with, or inconsistent."""


@dataclass
class TaskRecord:
    """One task: rank p, scale s, coefficients per layer, head tensors and free-form info."""

    name: str
    rank: int
    scale: float
    coefs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (E_B k_B×p, E_A k_A×p)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # "classifier.weight" -> tensor
    info: dict = field(default_factory=dict)  # type, labels, data_hash, source, ...


@dataclass
class SubspaceState:
    base_model_id: str
    base_model_hash: str
    target_modules: list[str]
    head_modules: list[str]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (β n×k_B, α d×k_A)
    tasks: list[TaskRecord]
    policy: KPolicy = field(default_factory=KPolicy)
    phi: int = 2
    parent: str | None = None
    extra: dict = field(default_factory=dict)  # metrics summary, code version, ...

    def task(self, name: str) -> TaskRecord:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r} in this subspace (tasks: {', '.join(self.task_names) or 'none'})")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def layer_table(self) -> dict[str, dict[str, int]]:
        return {
            name: {"n": b.shape[0], "d": a.shape[0], "k_B": b.shape[1], "k_A": a.shape[1]}
            for name, (b, a) in self.bases.items()
        }


def check_task_name(name: str) -> None:
    if not TASK_NAME.match(name):
        raise ValueError(f"task name {name!r} must match {TASK_NAME.pattern}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _manifest(state: SubspaceState, files: dict[str, str]) -> dict:
    return {
        "format": FORMAT,
        "base_model": {"id": state.base_model_id, "hash": state.base_model_hash},
        "target_modules": list(state.target_modules),
        "head_modules": list(state.head_modules),
        "layers": state.layer_table(),
        "phi": state.phi,
        "policy": {"k_max": state.policy.k_max, "energy": state.policy.energy, "error_budget": state.policy.error_budget},
        "tasks": [
            {"name": t.name, "rank": t.rank, "scale": t.scale, "heads": sorted(t.heads), "info": t.info}
            for t in state.tasks
        ],
        "parent": state.parent,
        "extra": state.extra,
        "files": files,
    }


def validate(state: SubspaceState) -> None:
    """Every shape consistent, every value finite, names legal. Raises VersionError."""
    names = state.task_names
    if len(set(names)) != len(names):
        raise VersionError(f"duplicate task names: {names}")
    for name in names:
        try:
            check_task_name(name)
        except ValueError as e:
            raise VersionError(str(e)) from None
    for layer, (b, a) in state.bases.items():
        for what, t in (("beta", b), ("alpha", a)):
            if t.ndim != 2 or not torch.isfinite(t).all():
                raise VersionError(f"layer {layer}: {what} must be a finite 2-D tensor, got shape {tuple(t.shape)}")
        for t in state.tasks:
            if layer not in t.coefs:
                raise VersionError(f"task {t.name}: no coefficients for layer {layer}")
            eb, ea = t.coefs[layer]
            if eb.shape != (b.shape[1], t.rank) or ea.shape != (a.shape[1], t.rank):
                raise VersionError(
                    f"task {t.name}, layer {layer}: coefficients {tuple(eb.shape)}/{tuple(ea.shape)}, "
                    f"expected {(b.shape[1], t.rank)}/{(a.shape[1], t.rank)}"
                )
            if not (torch.isfinite(eb).all() and torch.isfinite(ea).all()):
                raise VersionError(f"task {t.name}, layer {layer}: non-finite coefficients")
    for t in state.tasks:
        extra_layers = set(t.coefs) - set(state.bases)
        if extra_layers:
            raise VersionError(f"task {t.name}: coefficients for unknown layers {sorted(extra_layers)}")
        for key, h in t.heads.items():
            if not torch.isfinite(h).all():
                raise VersionError(f"task {t.name}: head tensor {key} is not finite")


def save(state: SubspaceState, path: str | os.PathLike) -> str:
    """Write a version directory atomically (temp dir + rename); return its content hash.

    Refuses to overwrite: versions are immutable.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"version directory {path} already exists; versions are immutable")
    validate(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "tasks").mkdir()
        basis = {}
        for layer, (b, a) in state.bases.items():
            basis[f"{layer}.beta"] = b.detach().cpu().contiguous()
            basis[f"{layer}.alpha"] = a.detach().cpu().contiguous()
        save_file(basis, tmp / "basis.safetensors")
        for t in state.tasks:
            tensors = {}
            for layer, (eb, ea) in t.coefs.items():
                tensors[f"coef_b.{layer}"] = eb.detach().cpu().contiguous()
                tensors[f"coef_a.{layer}"] = ea.detach().cpu().contiguous()
            for key, h in t.heads.items():
                tensors[f"head.{key}"] = h.detach().cpu().contiguous()
            save_file(tensors, tmp / "tasks" / f"{t.name}.safetensors")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*.safetensors"))}
        manifest = _manifest(state, files)
        manifest["content_hash"] = hashlib.sha256(_canonical(manifest)).hexdigest()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest["content_hash"]


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest, its content hash verified (files are checked by `load`)."""
    mpath = Path(path) / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise VersionError(f"{mpath}: missing; {path} is not a subspace version") from None
    except json.JSONDecodeError as e:
        raise VersionError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise VersionError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    claimed = manifest.pop("content_hash", None)
    actual = hashlib.sha256(_canonical(manifest)).hexdigest()
    if claimed != actual:
        raise VersionError(f"{mpath}: content hash {claimed} does not match the manifest ({actual})")
    manifest["content_hash"] = claimed
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise VersionError(f"{path}: unreadable safetensors ({e})") from None


def load(path: str | os.PathLike) -> SubspaceState:
    """Read and fully validate a version directory. Raises VersionError naming what is wrong."""
    path = Path(path)
    m = read_manifest(path)
    for rel, digest in m["files"].items():
        f = path / rel
        if not f.is_file():
            raise VersionError(f"{f}: listed in the manifest but missing")
        if _sha256(f) != digest:
            raise VersionError(f"{f}: sha256 does not match the manifest (modified or corrupt)")
    basis = _load_tensors(path / "basis.safetensors")
    bases = {}
    for layer in m["layers"]:
        try:
            bases[layer] = (basis[f"{layer}.beta"], basis[f"{layer}.alpha"])
        except KeyError as e:
            raise VersionError(f"basis.safetensors: missing {e.args[0]}") from None
    tasks = []
    for entry in m["tasks"]:
        check_task_name(entry["name"])
        tensors = _load_tensors(path / "tasks" / f"{entry['name']}.safetensors")
        coefs = {}
        for layer in m["layers"]:
            try:
                coefs[layer] = (tensors[f"coef_b.{layer}"], tensors[f"coef_a.{layer}"])
            except KeyError as e:
                raise VersionError(f"tasks/{entry['name']}.safetensors: missing {e.args[0]}") from None
        heads = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        tasks.append(TaskRecord(entry["name"], entry["rank"], entry["scale"], coefs, heads, entry["info"]))
    pol = m["policy"]
    state = SubspaceState(
        base_model_id=m["base_model"]["id"],
        base_model_hash=m["base_model"]["hash"],
        target_modules=m["target_modules"],
        head_modules=m["head_modules"],
        bases=bases,
        tasks=tasks,
        policy=KPolicy(pol["k_max"], pol["energy"], pol["error_budget"]),
        phi=m["phi"],
        parent=m["parent"],
        extra=m["extra"],
    )
    validate(state)
    if state.layer_table() != m["layers"]:
        raise VersionError(f"{path}: tensor shapes do not match the manifest's layer table")
    return state
