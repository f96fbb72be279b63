"""Step `update`: build the next subspace version from its parent and one or more landings.

A dataset landing is trained in the parent's subspace and merged (or, with no parent, trained
as a plain LoRA that initialises the subspace); adapter landings are absorbed in one merge.
This is the command each DVC stage runs, so it reads every knob from the workspace's
params.yaml and is deterministic for the same inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import typer
import yaml

import share_core
from share_core import state as st
from share_core.continual import MINILM_ID, load_classifier, learn
from share_core.metrics import accounting
from share_core.model import ShareModel
from share_core.peft_io import read_adapter
from share_core.subspace import KPolicy
from share_core.taskdata import data_hash, load_task, read_task_spec
from share_core.train import TrainConfig

DEFAULT_PARAMS = {
    "train": {"steps": 80, "batch_size": 16, "lr": 0.003, "max_length": 32, "rank": 8, "lora_alpha": 16, "seed": 0},
    "subspace": {"k_max": 32, "energy": None, "error_budget": None, "phi": 2, "compact_every": st.COMPACT_EVERY},
    "base": {"model_id": MINILM_ID, "model_path": None},
    "evaluate": {"mode": "changed-only", "certify_tolerance": 1e-5, "margin_floor": 1e-3, "batch_size": 64, "workers": 1, "dask_address": None},
}
BUILD_SECTIONS = ("train", "subspace", "base")  # what a version's bytes depend on (its DVC stage's params)


@dataclass(frozen=True)
class EvalParams:
    """How versions are evaluated. mode: `changed-only` keeps a task's recorded score when its
    ΔW provably did not move (certified, see pipelines.evaluate); `full` re-scores every task.
    workers: shards scored in parallel; dask_address: a Dask scheduler to send them to
    (None: in-process; $SHARE_DASK_ADDRESS overrides)."""

    mode: str = "changed-only"
    certify_tolerance: float = 1e-5
    margin_floor: float = 1e-3
    batch_size: int = 64
    workers: int = 1
    dask_address: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("changed-only", "full"):
            raise ValueError(f"evaluate.mode must be 'changed-only' or 'full', got {self.mode!r}")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError("evaluate.workers and evaluate.batch_size must be ≥ 1")


@dataclass(frozen=True)
class Params:
    train: TrainConfig
    policy: KPolicy
    phi: int
    model_id: str
    model_path: str | None
    compact_every: int = st.COMPACT_EVERY
    evaluate: EvalParams = EvalParams()


def load_params(path: Path | None) -> Params:
    """params.yaml (missing keys take the defaults above; unknown keys are an error)."""
    raw = yaml.safe_load(path.read_text()) if path and path.is_file() else {}
    merged = {}
    for section, defaults in DEFAULT_PARAMS.items():
        given = (raw or {}).get(section) or {}
        unknown = set(given) - set(defaults)
        if unknown:
            raise ValueError(f"{path}: unknown keys in section {section!r}: {sorted(unknown)}")
        merged[section] = {**defaults, **given}
    sub = merged["subspace"]
    if not 1 <= sub["compact_every"] <= st.MAX_CHAIN:
        raise ValueError(f"{path.name if path else 'params'}: subspace.compact_every must be between 1 and {st.MAX_CHAIN}, got {sub['compact_every']}")
    return Params(
        train=TrainConfig(**merged["train"], progress=False),
        policy=KPolicy(k_max=sub["k_max"], energy=sub["energy"], error_budget=sub["error_budget"]),
        phi=sub["phi"],
        model_id=merged["base"]["model_id"],
        model_path=merged["base"]["model_path"],
        compact_every=sub["compact_every"],
        evaluate=EvalParams(**merged["evaluate"]),
    )


def landing_hash(landing: Path, kind: str) -> str:
    if kind == "dataset":
        return data_hash(landing)
    h = hashlib.sha256()
    for f in sorted(p for p in landing.iterdir() if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def build_version(landings: list[Path], kind: str, out: Path, parent: Path | None, params: Params, provenance: dict | None = None) -> dict:
    """Write version `out` (atomically) from `parent` + `landings`; return its manifest.

    Each task records its landing directory's name (where its eval data lives) and
    `provenance` (e.g. the storage key/ETag) lands in the manifest, so a retried update can
    recognise a version it already built."""
    if kind not in ("dataset", "adapter"):
        raise ValueError(f"kind must be 'dataset' or 'adapter', got {kind!r}")
    if kind == "dataset" and len(landings) != 1:
        raise ValueError("a dataset update takes exactly one landing")
    if out.exists():
        raise FileExistsError(f"{out} already exists; versions are immutable")
    model, tok = load_classifier(params.model_path, params.train.seed)
    share = ShareModel(model, st.load(parent)) if parent else None
    infos = []
    for landing in landings:
        spec = read_task_spec(landing / "task.yaml")
        infos.append({"labels": list(spec.labels), "type": spec.type, "data_hash": landing_hash(landing, kind), "kind": kind, "landing": landing.name})
    if kind == "dataset":
        task = load_task(landings[0])
        share, _ = learn(share, model, tok, task, params.train, params.policy, params.phi, params.model_id, {"train": 0.0})
        share.state.tasks[-1].info.update(infos[0])
    else:
        adapters = [read_adapter(p, name=read_task_spec(p / "task.yaml").name) for p in landings]
        if share is None:
            share = ShareModel.from_adapters(model, adapters, base_model_id=params.model_id, policy=params.policy, phi=params.phi, infos=infos)
        else:
            share.absorb(adapters, infos)
    share.state.parent = parent.name if parent else None
    share.state.extra = {
        "added": [read_task_spec(p / "task.yaml").name for p in landings],
        "kind": kind,
        "reconstruction_error": share.last_errors,
        "code_version": share_core.__version__,
        "provenance": provenance or {},
        "accounting": {k: v for k, v in accounting(share.state).items() if k != "k"},  # what MLflow logs, without a reload
    }
    st.save(share.state, out, params.compact_every)
    return st.read_manifest(out)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    workspace: Path = typer.Option(Path("."), help="workspace root (holds params.yaml)"),
    landing: list[Path] = typer.Option(..., help="ingested landing dir(s), relative to the workspace"),
    kind: str = typer.Option(..., help="dataset | adapter"),
    out: Path = typer.Option(..., help="version dir to create, e.g. versions/v0003"),
    parent: Path | None = typer.Option(None, help="parent version dir"),
) -> None:
    """Build one subspace version (what a DVC stage runs)."""
    root = workspace.resolve()
    params = load_params(root / "params.yaml")
    manifest = build_version([root / p for p in landing], kind, root / out, root / parent if parent else None, params)
    typer.echo(f"{out}: {len(manifest['tasks'])} tasks, content {manifest['content_hash'][:12]}")


if __name__ == "__main__":
    app()
