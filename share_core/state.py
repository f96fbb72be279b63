"""SubspaceState: everything a version holds, and its atomic, validated save/load.

A version directory (DESIGN §5, §8: "a version stores what it changed"):
    manifest.json        base model id+hash, target/head modules, k/p/φ per layer, the tasks it
                         stores (a delta: its own; `read_manifest` appends them to its parent's),
                         parent, how the state is stored, sha256 of every file, content hash
    basis.safetensors    "<layer>.beta" (n×k_B), "<layer>.alpha" (d×k_A); in a delta also the
                         frames "<layer>.frame_b" (k_B×k_B_parent), "<layer>.frame_a" (float64)
    tasks.safetensors    the tasks this version stores: "coef_b.<layer>" (k_B×Σp), "coef_a.<layer>"
                         (k_A×Σp), their coefficients side by side in manifest order (storage
                         layout "stacked"; older versions: "<task>/coef_b.<layer>" per task),
                         and "<task>/head.<key>"
A *snapshot* stores every task. A *delta* stores only the tasks it added plus the frames: a
merge moves every old task by the same per-module change of coordinates (E' = frame·E), so the
old tasks' coefficients are the frames applied to the parent's (`subspace.apply_frame`, float64,
deterministic). Loading a delta loads its parent (a sibling directory) first; after
`compact_every` deltas in a row the next version is a snapshot, so a load reads a bounded chain.
What a landing writes is O(layers·k² + new tasks), not O(all tasks), in tensors and in text.

`state_sha256` (in the manifest) is the digest of the materialised state — every basis,
coefficient and head tensor — checked on every load: a restored version is bit-exact or refused.
The content hash covers the manifest and, through the file hashes, every stored byte.

Why one module of ~570 lines: it is one on-disk format — the writer, the reader, the typed
manifest and the validation of the same files — kept together so that they change together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .subspace import KPolicy, apply_frame

FORMAT = "share-subspace/2"
COMPACT_EVERY = 32  # deltas in a row before the next version is a snapshot
MAX_CHAIN = 4 * COMPACT_EVERY  # the longest chain a load follows (and the largest compact_every allowed)
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
class Delta:
    """How a merged state derives from the version it was merged from: its first `n_old` tasks'
    coefficients are `frames[layer]` (k_B'×k_B, k_A'×k_A; float64) applied to that version's,
    whose content hash is `base_hash` (None: an unsaved state, so no delta can be written)."""

    frames: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_hash: str | None
    n_old: int


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
    delta: Delta | None = None  # set by a merge: lets `save` write only what changed
    content_hash: str | None = None  # of the version this state was loaded from / saved as

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


def _stacked(coefs: list[torch.Tensor]) -> torch.Tensor:
    """Tasks' coefficients of one layer and side side by side (k×Σp); k×0 when there are none."""
    return torch.cat(coefs, 1) if coefs else torch.zeros(0, 0)


def state_sha256(state: SubspaceState) -> str:
    """Digest of the materialised state: bases, every task's coefficients, scale and head, in
    order. Two states with the same digest serve every task identically (bit for bit)."""
    h = hashlib.sha256()
    h.update(
        _canonical(
            {"tasks": [[t.name, t.rank, t.scale, sorted(t.heads)] for t in state.tasks], "layers": sorted(state.bases)}
        )
    )
    for layer in sorted(state.bases):
        b, a = state.bases[layer]
        cb = _stacked([t.coefs[layer][0] for t in state.tasks])
        ca = _stacked([t.coefs[layer][1] for t in state.tasks])
        for x in (b, a, cb, ca):
            h.update(str(tuple(x.shape)).encode())
            h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    for t in state.tasks:
        for key in sorted(t.heads):
            h.update(key.encode())
            h.update(t.heads[key].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _entry(t: TaskRecord) -> dict:
    return {"name": t.name, "rank": t.rank, "scale": t.scale, "heads": sorted(t.heads), "info": t.info}


def _manifest(state: SubspaceState, files: dict[str, str], storage: dict) -> dict:
    stored = set(storage["stored_tasks"])  # a delta lists only its own tasks (read_manifest assembles the rest)
    return {
        "format": FORMAT,
        "base_model": {"id": state.base_model_id, "hash": state.base_model_hash},
        "target_modules": list(state.target_modules),
        "head_modules": list(state.head_modules),
        "layers": state.layer_table(),
        "phi": state.phi,
        "policy": {
            "k_max": state.policy.k_max,
            "energy": state.policy.energy,
            "error_budget": state.policy.error_budget,
        },
        "tasks": [_entry(t) for t in state.tasks if t.name in stored],
        "parent": state.parent,
        "extra": state.extra,
        "storage": storage,
        "state_sha256": state_sha256(state),
        "files": files,
    }


@dataclass(frozen=True)
class TaskEntry:
    """One task of a manifest: its name, rank, scale, head modules and free-form info."""

    name: str
    rank: int
    scale: float
    heads: list[str]
    info: dict

    @classmethod
    def from_json(cls, data: dict) -> TaskEntry:
        """A copy: the lists and dicts of a (cached) manifest are never shared with a caller."""
        return cls(data["name"], data["rank"], data["scale"], list(data["heads"]), dict(data["info"]))

    def to_json(self) -> dict:
        return {"name": self.name, "rank": self.rank, "scale": self.scale, "heads": self.heads, "info": self.info}


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed: what every reader of a version sees (the JSON is `_manifest`'s,
    field for field, with `content_hash` verified by `read_manifest`)."""

    format: str
    base_model: dict  # {"id", "hash"}
    target_modules: list[str]
    head_modules: list[str]
    layers: dict[str, dict]  # layer -> {"n", "d", "k_B", "k_A", …}
    phi: float
    policy: dict  # {"k_max", "energy", "error_budget"}
    tasks: list[TaskEntry]
    parent: str | None
    extra: dict  # what the pipeline adds: provenance, kind, added, reconstruction_error, …
    storage: dict  # {"kind": "full" | "delta", "chain", "parent_content_hash", …}
    state_sha256: str
    files: dict[str, str]
    content_hash: str

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        known = {f.name for f in fields(cls)} - {"tasks"}
        tasks = [TaskEntry.from_json(t) for t in data["tasks"]]
        return cls(**{k: v for k, v in data.items() if k in known}, tasks=tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def provenance(self) -> dict | None:
        """The landing(s) this version was built from (set by the pipeline)."""
        return self.extra.get("provenance")

    @property
    def added(self) -> list[str]:
        """The tasks this version added to its parent's."""
        return list(self.extra.get("added", []))

    @property
    def kind(self) -> str:
        return self.extra.get("kind", "")

    @property
    def reconstruction_error(self) -> dict[str, float]:
        """Per old task, how far this version's merge moved its ΔW (relative Frobenius)."""
        return dict(self.extra.get("reconstruction_error", {}))


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
        for side in (0, 1):  # one check per layer and side, not per task
            if state.tasks and not torch.isfinite(_stacked([t.coefs[layer][side] for t in state.tasks])).all():
                bad = next(t.name for t in state.tasks if not torch.isfinite(t.coefs[layer][side]).all())
                raise VersionError(f"task {bad}, layer {layer}: non-finite coefficients")
    layers = set(state.bases)
    for t in state.tasks:
        if t.coefs.keys() != layers:
            raise VersionError(f"task {t.name}: coefficients for unknown layers {sorted(set(t.coefs) - layers)}")
    heads = [h.reshape(-1) for t in state.tasks for h in t.heads.values()]
    if heads and not torch.isfinite(torch.cat(heads)).all():  # one check for every head, then find the culprit
        for t in state.tasks:
            for key, h in t.heads.items():
                if not torch.isfinite(h).all():
                    raise VersionError(f"task {t.name}: head tensor {key} is not finite")


def _storage_plan(state: SubspaceState, path: Path, compact_every: int) -> dict:
    """Snapshot or delta: a delta needs the merge's frames, computed against the parent version
    that sits beside `path` with exactly the content hash the frames were computed from."""
    snapshot = {"kind": "snapshot", "layout": "stacked", "chain": [], "stored_tasks": state.task_names}
    d = state.delta
    if d is None or state.parent is None or d.base_hash is None:
        return snapshot
    parent = path.parent / state.parent
    try:
        pm = read_manifest(parent)
    except VersionError:
        return snapshot
    chain = pm.storage["chain"] + [state.parent]
    old = [json.loads(json.dumps(_entry(t))) for t in state.tasks[: d.n_old]]
    same_tasks = [e.to_json() for e in pm.tasks] == old  # names, ranks, heads and info: the delta lists none of them
    if (
        pm.content_hash != d.base_hash
        or not same_tasks
        or len(chain) > compact_every
        or set(d.frames) != set(state.bases)
    ):
        return snapshot
    return {
        "kind": "delta",
        "layout": "stacked",
        "chain": chain,
        "parent_content_hash": d.base_hash,
        "stored_tasks": state.task_names[d.n_old :],
        "task_entries": "stored",  # manifest "tasks" lists the stored tasks only (older deltas: every task)
    }


def save(state: SubspaceState, path: str | os.PathLike, compact_every: int = COMPACT_EVERY) -> str:
    """Write a version directory atomically (temp dir + rename); return its content hash.

    A merged state whose parent version sits beside `path` is written as a delta (frames + the
    new tasks) unless `compact_every` deltas precede it. Refuses to overwrite: versions are
    immutable.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"version directory {path} already exists; versions are immutable")
    if not 1 <= compact_every <= MAX_CHAIN:
        raise ValueError(f"compact_every must be between 1 and {MAX_CHAIN}, got {compact_every}")
    validate(state)
    plan = _storage_plan(state, path, compact_every)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        basis = {}
        for layer, (b, a) in state.bases.items():
            basis[f"{layer}.beta"] = b.detach().cpu().contiguous()
            basis[f"{layer}.alpha"] = a.detach().cpu().contiguous()
            if plan["kind"] == "delta":
                fb, fa = state.delta.frames[layer]
                basis[f"{layer}.frame_b"] = fb.detach().cpu().double().contiguous()
                basis[f"{layer}.frame_a"] = fa.detach().cpu().double().contiguous()
        save_file(basis, tmp / "basis.safetensors")
        tensors = {}
        by_name = {t.name: t for t in state.tasks}
        stored = [by_name[name] for name in plan["stored_tasks"]]
        if stored:  # the stored tasks' coefficients side by side, one tensor per layer and side
            for layer in state.bases:
                for i, s in enumerate("ba"):
                    tensors[f"coef_{s}.{layer}"] = torch.cat([t.coefs[layer][i].detach().cpu() for t in stored], 1)
        for t in stored:
            for key, h in t.heads.items():
                tensors[f"{t.name}/head.{key}"] = h.detach().cpu().contiguous()
        save_file(tensors, tmp / "tasks.safetensors")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
        manifest = _manifest(state, files, plan)
        manifest["content_hash"] = hashlib.sha256(_canonical(manifest)).hexdigest()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    state.content_hash = manifest["content_hash"]
    return manifest["content_hash"]


_VERIFIED: dict[tuple, str] = {}  # _file_key -> a manifest's verified text (versions are immutable)
_ASSEMBLED: dict[tuple, list[dict]] = {}  # the _file_keys of a delta's chain and its own -> its every task entry


def _file_key(path: Path) -> tuple:
    """Which manifest.json file `path` holds now: its path, inode, mtime and size."""
    mpath = path / "manifest.json"
    try:
        s = mpath.stat()
    except FileNotFoundError:
        raise VersionError(f"{mpath}: missing; {path} is not a subspace version") from None
    return (str(mpath.resolve()), s.st_ino, s.st_mtime_ns, s.st_size)


def _remember(cache: dict, key: tuple, value) -> None:
    if len(cache) >= 4 * MAX_CHAIN:
        cache.clear()
    cache[key] = value


def _own_manifest(path: Path) -> dict:
    """The version's own manifest.json, its content hash verified (once per file: a verified
    file's text is kept while the file stays the same, so a chain's snapshot is hashed once)."""
    mpath, key = path / "manifest.json", _file_key(path)
    if key in _VERIFIED:
        return json.loads(_VERIFIED[key])
    try:
        text = mpath.read_text()
        manifest = json.loads(text)
    except FileNotFoundError:
        raise VersionError(f"{mpath}: missing; {path} is not a subspace version") from None
    except json.JSONDecodeError as e:
        raise VersionError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise VersionError(f"{mpath}: format {found!r}, expected {FORMAT!r}")
    claimed = manifest.pop("content_hash", None)
    actual = hashlib.sha256(_canonical(manifest)).hexdigest()
    if claimed != actual:
        raise VersionError(f"{mpath}: content hash {claimed} does not match the manifest ({actual})")
    manifest["content_hash"] = claimed
    _remember(_VERIFIED, key, text)
    return manifest


def read_manifest(path: str | os.PathLike, _depth: int = 0) -> Manifest:
    """The manifest with every task of the version, its content hash verified (files are checked
    by `load`). A delta lists only the tasks it stores: the others are its parent's, read from the
    sibling directory and checked to be the version the delta was built on (once for the same
    files along the chain: a version's load reads every manifest of its chain)."""
    path = Path(path)
    manifest = _own_manifest(path)
    storage = manifest.get("storage") or {}
    if storage.get("kind") == "delta" and storage.get("task_entries") == "stored":
        if _depth > MAX_CHAIN:
            raise VersionError(f"{path}: delta chain longer than {MAX_CHAIN} versions")
        if not manifest.get("parent"):
            raise VersionError(f"{path}: a delta version without a parent")
        key = tuple(_file_key(path.parent / v) for v in storage.get("chain", [])) + (_file_key(path),)
        if key not in _ASSEMBLED:
            parent = read_manifest(path.parent / manifest["parent"], _depth + 1)
            if parent.content_hash != storage.get("parent_content_hash"):
                raise VersionError(f"{path}: parent {manifest['parent']} is not the version this delta was built on")
            _remember(_ASSEMBLED, key, [e.to_json() for e in parent.tasks] + manifest["tasks"])
        manifest["tasks"] = _ASSEMBLED[key]
    return Manifest.from_json(manifest)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view into one buffer read at once: O(bytes) plus a
    few microseconds per tensor (safetensors' own loader costs ~60 µs per tensor, which a
    thousand tasks' coefficients turn into seconds). The header is checked as strictly as the
    library does (known dtypes, shapes matching byte ranges that tile the data); anything else
    falls back to the library, which raises on a corrupt file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VersionError(f"{path}: unreadable safetensors ({e})") from None
    try:
        return _parse_safetensors(raw)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise VersionError(f"{path}: unreadable safetensors ({e})") from None


def _parse_safetensors(raw: bytes) -> dict[str, torch.Tensor]:
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 + n:
        raise ValueError("header longer than the file")
    header = json.loads(raw[8 : 8 + n].decode())
    header.pop("__metadata__", None)
    data = bytearray(raw[8 + n :])  # one writable copy: the tensors are views into it
    buf = torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    out, spans = {}, []
    for key, info in header.items():
        dtype = _DTYPES[info["dtype"]]
        shape = [int(x) for x in info["shape"]]
        start, stop = (int(x) for x in info["data_offsets"])
        count = math.prod(shape)
        if not 0 <= start <= stop <= len(data) or stop - start != count * dtype.itemsize:
            raise ValueError(f"{key}: byte range does not match its shape")
        spans.append((start, stop))
        out[key] = buf[start:stop].view(dtype).view(shape) if count else torch.zeros(shape, dtype=dtype)
    spans.sort()
    pos = 0
    for start, stop in spans:
        if start != pos:
            raise ValueError("tensors overlap or leave gaps")
        pos = stop
    if pos != len(data):
        raise ValueError("trailing bytes after the tensors")
    return out


def _get(tensors: dict, key: str, where: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise VersionError(f"{where}: missing {key}") from None


@dataclass
class _Stacked:
    """A version's coefficients as loaded: per layer both sides side by side (k×Σp, tasks in
    manifest order), per task its heads. Chains are applied in this form: one matmul per layer
    and side per version, whatever the number of tasks."""

    manifest: Manifest
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    coefs: dict[str, list[torch.Tensor]]  # layer -> [C_B k_B×Σp, C_A k_A×Σp]
    heads: dict[str, dict[str, torch.Tensor]]


def _load_stacked(path: Path, depth: int = 0) -> _Stacked:
    m = read_manifest(path)
    if depth > MAX_CHAIN:
        raise VersionError(f"{path}: delta chain longer than {MAX_CHAIN} versions")
    for rel, digest in m.files.items():
        f = path / rel
        if not f.is_file():
            raise VersionError(f"{f}: listed in the manifest but missing")
        if _sha256(f) != digest:
            raise VersionError(f"{f}: sha256 does not match the manifest (modified or corrupt)")
    basis = _load_tensors(path / "basis.safetensors")
    stored = _load_tensors(path / "tasks.safetensors")
    storage = m.storage
    bases = {
        layer: (_get(basis, f"{layer}.beta", "basis.safetensors"), _get(basis, f"{layer}.alpha", "basis.safetensors"))
        for layer in m.layers
    }
    names = m.task_names
    new = storage["stored_tasks"]
    if storage["kind"] == "delta":
        if not m.parent:
            raise VersionError(f"{path}: a delta version without a parent")
        parent = _load_stacked(path.parent / m.parent, depth + 1)
        if parent.manifest.content_hash != storage["parent_content_hash"]:
            raise VersionError(f"{path}: parent {m.parent} is not the version this delta was built on")
        old = parent.manifest.task_names
        if names != old + new:
            raise VersionError(f"{path}: tasks {names} are not the parent's {old} followed by the stored {new}")
        prefix = {
            layer: [
                apply_frame(_get(basis, f"{layer}.frame_{s}", "basis.safetensors"), parent.coefs[layer][i])
                for i, s in enumerate("ba")
            ]
            for layer in m.layers
        }
        heads = parent.heads
    else:
        if new != names:
            raise VersionError(f"{path}: a snapshot must store every task")
        prefix = {layer: [None, None] for layer in m.layers}
        heads = {}
    # One pass over the stored keys files every head under its task; every layer and side is then
    # assembled with one concatenation (the parent's framed block first): O(stored tensors), not
    # one growing copy per task and one scan of every key per task.
    stored_heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in stored.items():
        task, sep, rest = key.partition("/")
        if sep and rest.startswith("head."):
            stored_heads.setdefault(task, {})[rest[len("head.") :]] = value
    for name in new:
        check_task_name(name)
        heads[name] = stored_heads.get(name, {})
    stacked = storage.get("layout") == "stacked"  # else (older versions) one tensor per task, layer and side
    coefs = {}
    for layer in m.layers:
        coefs[layer] = []
        for i, s in enumerate("ba"):
            parts = [] if prefix[layer][i] is None else [prefix[layer][i]]
            if stacked and new:
                parts.append(_get(stored, f"coef_{s}.{layer}", "tasks.safetensors"))
            elif not stacked:
                parts += [_get(stored, f"{name}/coef_{s}.{layer}", f"tasks.safetensors ({name})") for name in new]
            if not parts:
                coefs[layer].append(torch.zeros(bases[layer][i].shape[1], 0))
            else:
                try:
                    coefs[layer].append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
                except RuntimeError as e:
                    raise VersionError(f"{path}: layer {layer}: coefficients do not line up ({e})") from None
    return _Stacked(m, bases, coefs, heads)


def load(path: str | os.PathLike) -> SubspaceState:
    """Read, materialise and fully validate a version (and the chain it is stored against).
    Raises VersionError naming what is wrong; the result's `state_sha256` equals the manifest's."""
    path = Path(path)
    s = _load_stacked(path)
    m = s.manifest
    widths = [t.rank for t in m.tasks]
    split = {}
    for layer, (cb, ca) in s.coefs.items():
        if cb.shape[1] != sum(widths) or ca.shape[1] != sum(widths):
            raise VersionError(
                f"{path}: layer {layer}: coefficients of {cb.shape[1]} columns, the tasks' ranks add to {sum(widths)}"
            )
        split[layer] = (torch.split(cb, widths, 1), torch.split(ca, widths, 1))
    tasks = [
        TaskRecord(
            e.name,
            e.rank,
            e.scale,
            {layer: (split[layer][0][j], split[layer][1][j]) for layer in m.layers},
            s.heads[e.name],
            e.info,
        )
        for j, e in enumerate(m.tasks)
    ]
    pol = m.policy
    state = SubspaceState(
        base_model_id=m.base_model["id"],
        base_model_hash=m.base_model["hash"],
        target_modules=m.target_modules,
        head_modules=m.head_modules,
        bases=s.bases,
        tasks=tasks,
        policy=KPolicy(pol["k_max"], pol["energy"], pol["error_budget"]),
        phi=m.phi,
        parent=m.parent,
        extra=m.extra,
        content_hash=m.content_hash,
    )
    validate(state)
    if state.layer_table() != m.layers:
        raise VersionError(f"{path}: tensor shapes do not match the manifest's layer table")
    if state_sha256(state) != m.state_sha256:
        raise VersionError(f"{path}: the materialised state does not match the state it was saved as (state_sha256)")
    return state


def chain(path: str | os.PathLike) -> list[str]:
    """The versions a version's load reads besides itself (its snapshot first): its own manifest
    says, so this works before they are pulled."""
    return list(_own_manifest(Path(path))["storage"]["chain"])
