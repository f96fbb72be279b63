"""params.yaml: every knob of a workspace, one schema whose defaults are the dataclasses' own.

Sections: `base` (share_core.base.BaseSpec: the base model, its family, target modules and
heads), `train` (share_core.train.TrainConfig), `subspace` (k policy, φ, compaction) and
`evaluate` (EvalParams). A missing key takes the dataclass default; an unknown key is an error
naming the file and the section. Other top-level sections (the repository's `tasks:`) are left
to whoever reads them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from share_core import state as st
from share_core.base import BaseSpec
from share_core.subspace import KPolicy
from share_core.train import TrainConfig

from .workspace import write_atomic

BUILD_SECTIONS = ("train", "subspace", "base")  # what a version's bytes depend on (its DVC stage's params)
OTHER_SECTIONS = ("tasks",)  # read by others (the repository's generate stage), not by this schema
NOT_PARAMS = {"train": {"progress"}}  # dataclass fields that are not workspace settings


@dataclass(frozen=True)
class SubspaceParams:
    """The k policy of every merge (k_max, explained energy, per-task error budget), φ
    temporary directions per side for a trained task, and how often a version is a full
    snapshot instead of a delta (share_core.state)."""

    k_max: int = 32
    energy: float | None = None
    error_budget: float | None = None
    phi: int = 2
    compact_every: int = st.COMPACT_EVERY

    def __post_init__(self) -> None:
        if not 1 <= self.compact_every <= st.MAX_CHAIN:
            raise ValueError(f"subspace.compact_every must be between 1 and {st.MAX_CHAIN}, got {self.compact_every}")
        if self.phi < 0 or self.k_max < 1:
            raise ValueError(f"subspace.phi must be ≥ 0 and subspace.k_max ≥ 1, got {self.phi} and {self.k_max}")
        self.policy  # noqa: B018 - KPolicy validates energy and error_budget now, not in the middle of an update

    @property
    def policy(self) -> KPolicy:
        return KPolicy(k_max=self.k_max, energy=self.energy, error_budget=self.error_budget)


@dataclass(frozen=True)
class EvalParams:
    """How versions are evaluated. mode: `changed-only` keeps a task's recorded score when its
    ΔW provably did not move (certified, see pipelines.evaluate); `full` re-scores every task.
    workers: shards scored in parallel; dask_address: a Dask scheduler to send them to
    (None: in-process; $SHARE_DASK_ADDRESS overrides). max_new_tokens: the longest greedy
    completion of a causal-LM task. gate_tolerance: the forgetting gate's largest allowed drop of
    any task's score against the champion (score units) before the champion may move."""

    mode: str = "changed-only"
    certify_tolerance: float = 1e-5
    margin_floor: float = 1e-3
    batch_size: int = 64
    workers: int = 1
    dask_address: str | None = None
    max_new_tokens: int = 16
    screen_rows: int = 16  # certified rows of truncated tasks re-scored per landing to check the sensitivity
    gate_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.screen_rows < 0:
            raise ValueError("evaluate.screen_rows must be ≥ 0")
        if not 0.0 <= self.gate_tolerance <= 1.0:
            raise ValueError(f"evaluate.gate_tolerance must be in [0, 1], got {self.gate_tolerance}")
        if self.mode not in ("changed-only", "full"):
            raise ValueError(f"evaluate.mode must be 'changed-only' or 'full', got {self.mode!r}")
        if self.workers < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("evaluate.workers, evaluate.batch_size and evaluate.max_new_tokens must be ≥ 1")


@dataclass(frozen=True)
class Params:
    base: BaseSpec = field(default_factory=BaseSpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    subspace: SubspaceParams = field(default_factory=SubspaceParams)
    evaluate: EvalParams = field(default_factory=EvalParams)

    @property
    def policy(self) -> KPolicy:
        return self.subspace.policy

    def to_dict(self) -> dict:
        """The YAML form: every section, every key (lists, not tuples)."""
        out = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {
                k.name: list(v) if isinstance(v := getattr(section, k.name), tuple) else v
                for k in dataclasses.fields(section)
                if k.name not in NOT_PARAMS.get(f.name, ())
            }
        return out

    def replace(self, **sections: dict) -> Params:
        """A copy with some keys changed: replace(train={"steps": 30})."""
        return dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **changes) for name, changes in sections.items()}
        )


SECTIONS = {f.name: f for f in dataclasses.fields(Params)}


def _typed(value, hint, key: str):
    """`value` as the field's type (int, float, str, bool, a tuple of str, or None where the
    field allows it); YAML's "1e-4" (a string: YAML 1.1 needs the dot) reads as a float."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if t is str and isinstance(value, str):
            return value
        if (
            typing.get_origin(t) is tuple
            and isinstance(value, (list, tuple))
            and all(isinstance(x, str) for x in value)
        ):
            return tuple(value)
    names = " or ".join(
        "empty" if t is type(None) else ("a list of names" if typing.get_origin(t) is tuple else t.__name__)
        for t in options
    )
    raise ValueError(f"{key} is {value!r}; expected {names}")


def load_params(path: Path | None) -> Params:
    """params.yaml (missing keys take the defaults; unknown sections and keys, and values of the
    wrong type, are errors naming the file and the key). A relative base.model_path is relative
    to the params file."""
    raw = yaml.safe_load(path.read_text()) if path and path.is_file() else {}
    where = path.name if path else "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    unknown_sections = sorted(set(raw) - set(SECTIONS) - set(OTHER_SECTIONS))
    if unknown_sections:
        raise ValueError(f"{where}: unknown section(s) {unknown_sections} (known: {sorted(SECTIONS)})")
    defaults = Params()
    sections = {}
    for name in SECTIONS:
        given = raw.get(name)
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ValueError(f"{where}: section {name!r} must be a mapping, got {type(given).__name__}")
        known = set(defaults.to_dict()[name])
        unknown = set(given) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys in section {name!r}: {sorted(unknown)} (known: {sorted(known)})")
        hints = typing.get_type_hints(type(getattr(defaults, name)))
        try:
            sections[name] = {k: _typed(v, hints[k], f"{name}.{k}") for k, v in given.items()}
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    model_path = sections["base"].get("model_path")
    if model_path and path and not Path(model_path).is_absolute():
        sections["base"]["model_path"] = str((path.parent / model_path).resolve())
    try:
        return defaults.replace(**sections)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def edit_params(path: Path, **sections: dict) -> Params:
    """Change some keys of the params.yaml at `path` (validated; other sections kept):
    edit_params(ws.params_path, train={"steps": 10})."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    params = load_params(path).replace(**sections)
    save_params(path, params, {k: v for k, v in (raw or {}).items() if k not in SECTIONS})
    return params


def save_params(path: Path, params: Params, extra: dict | None = None) -> None:
    """Write `params` (plus other top-level sections in `extra`) atomically."""
    write_atomic(Path(path), yaml.safe_dump({**(extra or {}), **params.to_dict()}, sort_keys=False))
