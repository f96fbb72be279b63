"""Step `update`: build the next subspace version from its parent and one or more landings.

A dataset landing is trained in the parent's subspace and merged (or, with no parent, trained
as a plain LoRA that initialises the subspace); adapter landings are absorbed in one merge.
This is the command each DVC stage runs, so it reads every knob from the workspace's
params.yaml and is deterministic for the same inputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

import share_core
from share_core import state as st
from share_core.base import load_base
from share_core.continual import learn
from share_core.metrics import accounting
from share_core.model import ShareModel
from share_core.peft_io import read_adapter
from share_core.taskdata import TaskData, data_hash, load_task, read_examples, read_task_spec

from . import evaluate
from .params import Params, load_params
from .workspace import VERSION_ID, Workspace


def landing_hash(landing: Path, kind: str) -> str:
    if kind == "dataset":
        return data_hash(landing)
    h = hashlib.sha256()
    for f in sorted(p for p in landing.iterdir() if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def build_version(
    landings: list[Path], kind: str, out: Path, parent: Path | None, params: Params, provenance: dict | None = None
) -> dict:
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
    evaluate.release_loaded()
    model, tok = load_base(params.base, params.train.seed)
    share = ShareModel(model, st.load(parent)) if parent else None
    infos = []
    for landing in landings:
        spec = read_task_spec(landing / "task.yaml")
        infos.append(
            {
                "labels": list(spec.labels),
                "type": spec.type,
                "data_hash": landing_hash(landing, kind),
                "kind": kind,
                "landing": landing.name,
            }
        )
    fam = params.base.family_impl()
    scoring = dict(
        max_length=params.train.max_length,
        batch_size=params.evaluate.batch_size,
        max_new_tokens=params.evaluate.max_new_tokens,
    )
    for landing, info in zip(landings, infos):  # a generative task's baseline: the untrained base's own score
        if (landing / "eval.jsonl").is_file():
            spec = read_task_spec(landing / "task.yaml")
            data = TaskData(spec=spec, train=[], eval=read_examples(landing / "eval.jsonl", spec), root=landing)
            zero = fam.zero_shot(share if share is not None else model, tok, data, **scoring)
            if zero is not None:
                info["baseline"] = zero
    if kind == "dataset":
        task = load_task(landings[0])
        share, _ = learn(
            share, model, tok, task, params.train, params.policy, params.subspace.phi, params.base, {"train": 0.0}
        )
        share.state.tasks[-1].info.update(infos[0])
    else:
        adapters = [read_adapter(p, name=read_task_spec(p / "task.yaml").name) for p in landings]
        if share is None:
            share = ShareModel.from_adapters(
                model,
                adapters,
                base_model_id=params.base.model_id,
                policy=params.policy,
                phi=params.subspace.phi,
                infos=infos,
            )
        else:
            share.state.phi = params.subspace.phi
            share.absorb(adapters, infos, policy=params.policy)  # the params' k policy, not the parent's
    share.state.parent = parent.name if parent else None
    share.state.extra = {
        "added": [read_task_spec(p / "task.yaml").name for p in landings],
        "kind": kind,
        "reconstruction_error": share.last_errors,
        "code_version": share_core.__version__,
        "base_source": params.base.source,  # the packaged file's sha256 (SmolLM2's GGUF), beside the W0 hash
        "provenance": provenance or {},
        "accounting": {
            k: v for k, v in accounting(share.state).items() if k != "k"
        },  # what MLflow logs, without a reload
    }
    content_hash = st.save(share.state, out, params.subspace.compact_every)
    if VERSION_ID.match(out.name) and (out.parent.parent / "params.yaml").is_file():
        # in a workspace: this process's evaluation of the version reuses this model (no second load)
        evaluate.seed_loaded(str(out.parent.parent), out.name, content_hash, share, tok, params)
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
    params = load_params(Workspace(root).params_path)
    manifest = build_version([root / p for p in landing], kind, root / out, root / parent if parent else None, params)
    typer.echo(f"{out}: {len(manifest.tasks)} tasks, content {manifest.content_hash[:12]}")


if __name__ == "__main__":
    app()
