"""The update as one transaction over five systems (workspace, DVC + git, MLflow, HEAD, the
bucket's status): its ordered steps, what each changes and how it is undone, and the undo of a
stale update. The journal (pipelines.journal) records the steps; flows/continual.py runs them
(as Prefect tasks) and calls `undo` for an update whose parent is no longer HEAD.

Every step's *do* is idempotent and checks the real system before acting (the pipelines
function it calls does: `register.log_run` reuses a FINISHED run of the same content hash,
`register_model_version` the model version, `lineage.add_version_stage` the stage, …), so a
resumed update re-runs only what its journal does not list as done. *undo* touches only what
this update built: its version directory must carry its provenance on its parent, be nobody's
parent and not be HEAD (a version another update of the same id built is never touched).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from share_core import state as st

from . import lineage, register
from .journal import DISCARDED, STEPS, Journal
from .workspace import Workspace


@dataclass(frozen=True)
class Step:
    name: str
    system: str  # what the step changes
    undo: str  # what a discard does about it


PLAN = (
    Step("validate", "nothing (checked against HEAD)", "nothing"),
    Step("ingest", "landings/<task>-<etag> + its DVC entry", "kept: content-addressed, harmless"),
    Step("build", "versions/<v>", "removed"),
    Step("stage", "dvc.yaml stage of <v>", "removed"),
    Step("evaluate", "evaluations/<v>.json", "removed"),
    Step("lineage", "a git commit of the stage", "kept: history"),
    Step("run", "MLflow run of <v>", "ended FAILED if still RUNNING"),
    Step("model_version", "MLflow model version of <v>", "tagged share.discarded + reason"),
    Step("alias", "candidate/champion aliases", "moved back to where they were"),
    Step("head", "HEAD", "never undone: an update that moved HEAD always resumes"),
    Step("push", "DVC remote", "kept: content-addressed"),
    Step("ledger", "ledger.json outcome", "never undone (after HEAD)"),
    Step("mark", "the bucket's status file", "never undone (after HEAD)"),
)
assert tuple(s.name for s in PLAN) == STEPS, "the plan and the journal's steps must agree"


def built_by(ws: Workspace, j: Journal) -> dict | None:
    """The manifest of `j`'s version when this update built it and nothing depends on it
    (its provenance on its parent, not HEAD, nobody's parent); else None."""
    vdir = ws.version_dir(j.version)
    if not (vdir / "manifest.json").is_file():
        return None
    built = st.read_manifest(vdir)
    if built["extra"].get("provenance") != j.provenance or built["parent"] != j.parent or ws.head() == j.version:
        return None
    for v in ws.version_ids():
        if v != j.version and st.read_manifest(ws.version_dir(v))["parent"] == j.version:
            return None
    return built


def undo(ws: Workspace, j: Journal, *, model_name: str, tracking_uri: str | None, reason: str) -> bool:
    """Discard a stale update: undo, last step first, what it published (MLflow: run, model
    version, aliases; the evaluation record; the DVC stage; the version directory) — also when
    the crash came between a step and its journal entry — then close the journal DISCARDED with
    the reason. True when something it built was removed."""
    built = built_by(ws, j)
    if built is not None:
        register.discard_version(  # alias, model_version, run
            ws,
            j.version,
            built["content_hash"],
            model_name=model_name,
            aliases_before=j.before("alias") or None,
            reason=reason,
            tracking_uri=tracking_uri,
        )
        ws.evaluation_path(j.version).unlink(missing_ok=True)  # evaluate
        lineage.remove_version_stage(ws.root, j.version)  # stage
        shutil.rmtree(ws.version_dir(j.version))  # build
    j.close(DISCARDED, reason=reason)
    return built is not None
