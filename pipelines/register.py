"""Step `register`: a version becomes an MLflow run + a model version; aliases; rollback.

Per version: one run in the experiment named like the registered model, with params (the
knobs that built it), metrics (ACC, BWT, every task's score and majority baseline, storage
against one LoRA per task, reconstruction errors), artifacts (the version's manifest and
`dvc.json` — where DVC keeps its tensors, which are stored once, not again in MLflow — under
`subspace/`, which is also an MLflow pyfunc model of the version (pipelines.pyfunc), the
evaluation record and its picture) and one model
version whose tags carry the lineage (parent, landing key/ETag, data hashes, git revision and
DVC hashes). Aliases: `candidate` = newest; `champion` moves only when the forgetting gate
passes — no task the champion serves scores more than `tolerance` lower in the new version.
A rollback moves `champion` (and the workspace HEAD) to a chosen version and is itself
recorded as a run. Works the same on a sqlite store and an MLflow server.

Why one module of ~540 lines: every function here talks to one MLflow registry through one
`Registry` object, and the run, the model version, the aliases, the gate and the rollback share
the tags that tie them together (share.version, share.content_hash); split, the tag vocabulary
would live in several places.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import typer
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from share_core import state as st
from share_core.metrics import accounting

from .evaluate import EvaluationRecord, publish_head, read_record
from .params import load_params
from .pyfunc import write_model
from .workspace import DEFAULT_MODEL_NAME, Workspace, parse_version_id

CANDIDATE, CHAMPION = "candidate", "champion"
METRICS_PER_CALL = 1000  # MLflow's log_batch limit
MAX_DESCRIBED = 20  # changed scores written out in a model version's description
SENSITIVE = ("secret", "password", "token", "access_key", "credential")


@dataclass(frozen=True)
class Registry:
    """Where a chain's versions are registered: the MLflow registered model `model_name` (and
    the experiment of the same name) in the tracking store `tracking_uri`, for the workspace
    `ws` whose versions they are. `tracking_uri` None means the workspace's own sqlite store
    (`ws.tracking_uri`); the environment's MLFLOW_TRACKING_URI is the CLI's to resolve, not
    this object's. One value instead of the (workspace, model name, tracking URI) every step
    of an update used to thread; the flows keep plain strings as their parameters (deployments
    and the CLI pass strings) and build one of these at their entry. Every function here takes
    one, also those that read only the registry (list_versions, champion_version): all their
    callers have a workspace."""

    ws: Workspace
    model_name: str = DEFAULT_MODEL_NAME
    tracking_uri: str | None = None

    @property
    def uri(self) -> str:
        """The tracking (and model registry) URI in use."""
        return self.tracking_uri or self.ws.tracking_uri

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def _experiment(c, reg: Registry) -> str:
    exp = c.get_experiment_by_name(reg.model_name)
    if exp is not None:
        return exp.experiment_id
    local = reg.uri.startswith(("sqlite:", "file:"))
    return c.create_experiment(reg.model_name, artifact_location=reg.ws.artifact_uri if local else None)


def _registered(c, name: str):
    try:
        return c.get_registered_model(name)
    except MlflowException:
        return c.create_registered_model(
            name, description="Share: one shared LoRA subspace per layer, one version per landing."
        )


def _clean(d: dict) -> dict:
    """No credentials in params or tags, whatever a caller passes."""
    return {k: v for k, v in d.items() if not any(s in k.lower() for s in SENSITIVE)}


def model_version_of(c, model_name: str, version: str):
    hits = [
        mv
        for mv in c.search_model_versions(f"name='{model_name}' and tag.`share.version`='{version}'")
        if mv.tags.get("share.discarded") != "true"
    ]
    if not hits:
        raise KeyError(f"version {version} is not registered under {model_name!r}")
    return max(hits, key=lambda mv: int(mv.version))


def _alias_version(c, model_name: str, alias: str) -> str | None:
    """The Share version id an alias points at (None when unset)."""
    try:
        mv = c.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return mv.tags.get("share.version")


def forgetting_gate(new: EvaluationRecord, champion: EvaluationRecord | None, tolerance: float) -> dict:
    """Pass when no task scored by both drops more than `tolerance` (accuracy units); "drops":
    every task that dropped, "carried": those of them whose score is a carried (certified) one."""
    if champion is None:
        return {"passed": True, "drops": {}, "against": None}
    # only the tasks that dropped: the gate's size follows the changes, not the history
    drops = {
        t: d
        for t, s in new.scores.items()
        if s is not None and champion.scores.get(t) is not None and (d := champion.scores[t] - s) > 0
    }
    worst = max(drops.values(), default=0.0)
    return {
        "passed": worst <= tolerance,
        "drops": drops,
        "worst_drop": worst,
        "against": champion.version,
        # how the new scores were checked (pipelines.evaluate: scored / rows / screened / certified):
        # a certified score is the recorded one, carried because no row of it can have flipped
        "checks": new.checks,
        "carried": sorted(t for t in drops if new.results.get(t, {}).get("check") in ("certified", "screened")),
    }


def gate_for(reg: Registry, version: str, *, tolerance: float | None = None) -> dict:
    """The forgetting gate of `version` against the current champion's recorded scores, with the
    workspace's `evaluate.gate_tolerance` unless a tolerance is given."""
    ws = reg.ws
    if tolerance is None:
        tolerance = load_params(ws.params_path).evaluate.gate_tolerance
    champ_id = _alias_version(reg.client(), reg.model_name, CHAMPION)
    champ = read_record(ws, champ_id) if champ_id and champ_id != version else None
    return {
        **forgetting_gate(read_record(ws, version), champ, tolerance),
        "champion_before": champ_id,
    }


def _tags(
    ws: Workspace,
    version: str,
    manifest: st.Manifest,
    record: EvaluationRecord,
    landing: dict,
    lineage: dict,
    gate: dict,
) -> dict:
    tags = _clean(
        {
            "share.version": version,
            "share.parent": manifest.parent or "",
            "share.task": ",".join(manifest.added),
            "share.kind": manifest.kind,
            "share.content_hash": manifest.content_hash,
            "landing.key": str(landing.get("key", landing.get("batch", ""))),
            "landing.etag": str(landing.get("etag", "")),
            "lineage.git_rev": lineage.get("git_rev", ""),
            "lineage.dvc_stage": lineage.get("dvc_stage", ""),
            "lineage.dvc_hashes": json.dumps(lineage.get("dvc_hashes", {}), sort_keys=True)[:4900],
            "share.state_sha256": manifest.state_sha256,
            "evaluation.certified": str(len(record.certified)),
            "evaluation.rescored": str(len(record.rescored)),
            "gate.passed": str(gate["passed"]).lower(),
            "acc": "" if record.acc is None else f"{record.acc:.6f}",
            "bwt": f"{record.bwt:.6f}",
        }
    )
    for t in manifest.tasks:
        if t.name in manifest.added and t.info.get("data_hash"):
            tags[f"data_hash.{t.name}"] = t.info["data_hash"]
    return tags


def finished_run(reg: Registry, version: str, *, end_abandoned: bool = False) -> str | None:
    """The FINISHED MLflow run of this exact version (its content hash), or None; with
    `end_abandoned`, one a crashed update left RUNNING is ended FAILED on the way."""
    c = reg.client()
    exp = c.get_experiment_by_name(reg.model_name)
    if exp is None:
        return None
    content_hash = st.read_manifest(reg.ws.version_dir(version)).content_hash
    for run in c.search_runs(
        [exp.experiment_id], f"tags.`share.version` = '{version}' and tags.`share.content_hash` = '{content_hash}'"
    ):
        if run.info.status == "FINISHED":
            return run.info.run_id
        if end_abandoned and run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "FAILED")
    return None


def log_run(reg: Registry, version: str, *, landing: dict, lineage: dict, gate: dict) -> str:
    """The version's MLflow run (params, metrics, manifest, evaluation): its id. Idempotent: a
    FINISHED run of this exact version (content hash) is reused; one left RUNNING by a crash
    is ended FAILED and replaced."""
    ws, c = reg.ws, reg.client()
    vdir = ws.version_dir(version)
    manifest = st.read_manifest(vdir)
    record = read_record(ws, version)
    exp_id = _experiment(c, reg)
    found = finished_run(reg, version, end_abandoned=True)
    if found:
        return found
    tags = _tags(ws, version, manifest, record, landing, lineage, gate)
    rid = c.create_run(exp_id, run_name=version, tags=tags).info.run_id
    try:
        policy = manifest.policy
        params = {
            "version": version,
            "parent": manifest.parent or "none",
            "tasks": len(manifest.tasks),
            "phi": manifest.phi,
            **{f"policy.{k}": v for k, v in policy.items()},
            "base_model": manifest.base_model["id"],
        }
        if ws.params_path.is_file():
            for section, values in (yaml.safe_load(ws.params_path.read_text()) or {}).items():
                params.update({f"{section}.{k}": v for k, v in (values or {}).items()})
        for k, v in _clean(params).items():
            c.log_param(rid, k, "none" if v is None else str(v)[:500])
        acct = manifest.extra.get("accounting") or accounting(st.load(vdir))
        rescored = record.rescored
        metrics = {
            "acc": record.acc,
            "bwt": record.bwt,
            "tasks_certified": len(record.certified),
            "tasks_rescored": len(rescored),
        }
        # a task's score only where it changed against the parent's record (new tasks, re-scored
        # rows that moved it): O(changes), not O(T) per version; MLflow's chart of score.<task>
        # steps from the last logged value. The whole row is the evaluation artifact (and DVC's).
        metrics.update({f"score.{t}": s for t, s in changed_scores(ws, manifest, record).items()})
        metrics.update({f"majority.{t}": record.majority[t] for t in rescored})
        metrics.update(
            {f"reconstruction_error.{t}": e for t, e in manifest.reconstruction_error.items() if t in rescored}
        )
        metrics.update(
            {
                k: acct[k]
                for k in (
                    "basis_params",
                    "coefficient_params",
                    "head_params",
                    "share_params",
                    "lora_per_task_params",
                    "share_bytes",
                    "lora_per_task_bytes",
                    "ratio_vs_lora",
                )
            }
        )
        ts = int(time.time() * 1000)

        batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), METRICS_PER_CALL):
            c.log_batch(rid, metrics=batch[i : i + METRICS_PER_CALL])
        # the tensors live once, in DVC (workspace cache + remote); the run holds the manifest
        # and where to get them, not a third and fourth copy
        c.log_artifact(rid, str(vdir / "manifest.json"), "subspace")
        c.log_text(
            rid,
            json.dumps(
                {
                    "path": f"versions/{version}",
                    "dvc_stage": lineage.get("dvc_stage", ""),
                    "dvc_hashes": lineage.get("dvc_hashes", {}),
                    "git_rev": lineage.get("git_rev", ""),
                    "chain": manifest.storage["chain"],
                    "state_sha256": manifest.state_sha256,
                },
                indent=2,
                sort_keys=True,
            ),
            "subspace/dvc.json",
        )
        with (
            tempfile.TemporaryDirectory() as tmp
        ):  # subspace/ is also an MLflow model (pyfunc flavor) that loads this version
            c.log_artifacts(rid, str(write_model(Path(tmp) / "model", ws, version)), "subspace")
        for f in (ws.evaluation_path(version), ws.evaluations / f"{version}.png"):
            if f.is_file():
                c.log_artifact(rid, str(f), "evaluation")
        c.log_text(rid, json.dumps(gate, indent=2), "evaluation/gate.json")
        c.set_terminated(rid, "FINISHED")
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    return rid


def model_version_for_run(reg: Registry, version: str, run_id: str) -> str | None:
    """The model version registered for `version` from `run_id` (not discarded), or None."""
    try:
        found = reg.client().search_model_versions(f"name='{reg.model_name}' and tag.`share.version`='{version}'")
    except MlflowException:  # the registered model does not exist yet
        return None
    return next(
        (str(mv.version) for mv in found if mv.run_id == run_id and mv.tags.get("share.discarded") != "true"), None
    )


def register_model_version(reg: Registry, version: str, run_id: str, *, gate: dict) -> str:
    """The registered model version of `version` (its number). Idempotent: one already
    registered for this version from this run is returned, never a second one."""
    ws, c = reg.ws, reg.client()
    _registered(c, reg.model_name)
    found = model_version_for_run(reg, version, run_id)
    if found:
        return found
    run = c.get_run(run_id)
    manifest = st.read_manifest(ws.version_dir(version))
    record = read_record(ws, version)
    mv = c.create_model_version(
        reg.model_name,
        source=f"{run.info.artifact_uri}/subspace",
        run_id=run_id,
        tags=dict(run.data.tags),
        description=_description(version, manifest, record, gate, changed_scores(ws, manifest, record)),
    )
    return str(mv.version)


def aliases(reg: Registry) -> dict[str, str | None]:
    """{"candidate": model version or None, "champion": …}: what a rollback of this step restores."""
    try:
        current = reg.client().get_registered_model(reg.model_name).aliases or {}
    except MlflowException:
        current = {}
    return {a: (str(current[a]) if a in current else None) for a in (CANDIDATE, CHAMPION)}


def move_aliases(reg: Registry, model_version: str, *, promote: bool) -> None:
    """`candidate` → model_version, and `champion` too when the gate passed (idempotent)."""
    c = reg.client()
    c.set_registered_model_alias(reg.model_name, CANDIDATE, model_version)
    if promote:
        c.set_registered_model_alias(reg.model_name, CHAMPION, model_version)


def discard_version(
    reg: Registry, version: str, content_hash: str, *, aliases_before: dict | None, reason: str
) -> None:
    """Undo what a stale update published in MLflow — only what carries its version's content
    hash: its runs end FAILED, its model versions are tagged discarded, and aliases it moved go
    back to where they were."""
    c, model_name = reg.client(), reg.model_name
    mine = f"tag.`share.version`='{version}' and tag.`share.content_hash`='{content_hash}'"
    exp = c.get_experiment_by_name(model_name)
    if exp is not None:
        for run in c.search_runs([exp.experiment_id], mine.replace("tag.", "tags.")):
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, "FAILED")
    try:
        mvs = c.search_model_versions(f"name='{model_name}' and {mine}")
    except MlflowException:
        mvs = []
    current = aliases(reg)
    for mv in mvs:
        c.set_model_version_tag(model_name, mv.version, "share.discarded", "true")
        c.set_model_version_tag(model_name, mv.version, "share.discarded_reason", reason[:4900])
        for alias in (CANDIDATE, CHAMPION):
            if current[alias] == str(mv.version):
                before = (aliases_before or {}).get(alias)
                if before:
                    c.set_registered_model_alias(model_name, alias, before)
                else:
                    c.delete_registered_model_alias(model_name, alias)


def registration(version: str, model_version: str, run_id: str, gate: dict) -> dict:
    """What an update reports about its registration."""
    return {
        "model_version": model_version,
        "run_id": run_id,
        "promoted": gate["passed"],
        "gate": gate,
        "champion": version if gate["passed"] else gate.get("champion_before"),
    }


def changed_scores(ws: Workspace, manifest: st.Manifest, record: EvaluationRecord) -> dict[str, float]:
    """The scores of `record` that differ from its parent version's record (all of them without one)."""
    parent = read_record(ws, manifest.parent)
    before = parent.scores if parent is not None else {}
    return {t: s for t, s in record.scores.items() if s is not None and (t not in before or before[t] != s)}


def _description(
    version: str, manifest: st.Manifest, record: EvaluationRecord, gate: dict, changed: dict[str, float]
) -> str:
    added = ", ".join(manifest.added) or "—"
    shown = list(changed.items())[:MAX_DESCRIBED]
    scores = ", ".join(f"{t} {s:.3f}" for t, s in shown) or "none changed"
    if len(changed) > len(shown):
        scores += f" and {len(changed) - len(shown)} more"
    verdict = (
        "passed" if gate["passed"] else f"failed (worst drop {gate.get('worst_drop', 0):.3f} vs {gate['against']})"
    )
    acc = "n/a" if record.acc is None else f"{record.acc:.3f}"
    return (
        f"Share subspace {version} (parent {manifest.parent or 'none'}): {manifest.kind} "
        f"{added}. "
        f"{len(manifest.tasks)} tasks; ACC {acc}, BWT {record.bwt:+.3f}. Scores that changed: {scores}. "
        "Forgetting gate "
        f"{verdict}."
    )


def registered_versions(c, model_name: str) -> list[str]:
    """The Share version ids registered under `model_name` (sorted; [] when the model is new)."""
    try:
        hits = c.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return []
    return sorted(
        {v for mv in hits if (v := mv.tags.get("share.version")) and mv.tags.get("share.discarded") != "true"},
        key=lambda v: (len(v), v),
    )


def rollback_target(reg: Registry, text: str) -> str:
    """The version id a user's rollback argument names ("v3", "3", "v0003" → "v0003"), checked
    against the registered versions before anything changes; raises VersionIdError (one line
    listing the existing versions) for "v0099", "latest", "../v0001" and the like."""
    return parse_version_id(text, registered_versions(reg.client(), reg.model_name))


def rollback(reg: Registry, version: str, *, reason: str = "") -> dict:
    """Point `champion` at `version`, make it the workspace HEAD, record the rollback as a run.
    `version` may be written v3 / 3 / v0003; an unknown one raises VersionIdError before
    anything changes. When `version` is already the champion and the HEAD this is a no-op
    (no run; "noop": True); when it is the champion but HEAD moved on (a candidate that failed
    the gate), only HEAD moves back, recorded as a run. The same pieces, in the same order, are
    the journaled rollback's steps (pipelines.transaction.ROLLBACK)."""
    out = rollback_plan(reg, version)
    if out["noop"]:
        return out
    run_id = record_rollback(reg, out["champion"], previous=out["previous"], reason=reason)
    point_champion(reg, out["champion"], run_id)
    move_head(reg.ws, out["champion"])
    return {**out, "run_id": run_id}


def rollback_plan(reg: Registry, version: str) -> dict:
    """What a rollback to `version` does, checked before anything changes: the normalised id,
    the champion it replaces, its model version, and whether there is nothing to do."""
    ws, c, model_name = reg.ws, reg.client(), reg.model_name
    version = parse_version_id(version, registered_versions(c, model_name))
    mv = model_version_of(c, model_name, version)
    if not (ws.version_dir(version) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"versions/{version} is missing from the workspace; restore it (dvc pull {version}) before rolling back"
        )
    previous = _alias_version(c, model_name, CHAMPION)
    noop = previous == version and ws.head() == version
    return {"champion": version, "previous": previous, "model_version": str(mv.version), "run_id": None, "noop": noop}


def record_rollback(
    reg: Registry, version: str, *, previous: str | None, reason: str, rollback_id: str | None = None
) -> str:
    """The rollback's MLflow run (FINISHED); `rollback_id` ties it to its journal."""
    c = reg.client()
    run = c.create_run(
        _experiment(c, reg),
        run_name=f"rollback-to-{version}",
        tags={
            "share.event": "rollback",
            "share.version": version,
            "rollback.from": previous or "",
            "rollback.head_from": reg.ws.head() or "",
            "rollback.reason": reason[:4900],
            **({"share.rollback_id": rollback_id} if rollback_id else {}),
        },
    )
    c.log_param(run.info.run_id, "to_version", version)
    c.log_param(run.info.run_id, "from_version", previous or "none")
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def rollback_recorded(reg: Registry, rollback_id: str) -> str | None:
    """The FINISHED run of the rollback `rollback_id`, or None."""
    c = reg.client()
    exp = c.get_experiment_by_name(reg.model_name)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`share.rollback_id` = '{rollback_id}'")
    return next((r.info.run_id for r in runs if r.info.status == "FINISHED"), None)


def point_champion(reg: Registry, version: str, run_id: str) -> None:
    """`champion` → `version`'s model version, which records the rollback run that moved it."""
    c = reg.client()
    mv = model_version_of(c, reg.model_name, version)
    if _alias_version(c, reg.model_name, CHAMPION) != version:
        c.set_registered_model_alias(reg.model_name, CHAMPION, mv.version)
    c.set_model_version_tag(reg.model_name, mv.version, "rollback.run_id", run_id)


def champion_is(reg: Registry, version: str) -> bool:
    return _alias_version(reg.client(), reg.model_name, CHAMPION) == version


def move_head(ws: Workspace, version: str) -> None:
    """HEAD → `version`, and what DVC reports follows (a version pulled back without its
    untracked evaluation record is re-evaluated by the rollback instead)."""
    ws.set_head(version)
    if read_record(ws, version) is not None:
        publish_head(ws, version)


def list_versions(reg: Registry) -> list[dict]:
    """Every registered version, oldest first, with its aliases and summary tags."""
    c, model_name = reg.client(), reg.model_name
    try:
        aliases = c.get_registered_model(model_name).aliases or {}
    except MlflowException:
        return []
    by_mv: dict[str, list[str]] = {}
    for alias, mv in aliases.items():
        by_mv.setdefault(str(mv), []).append(alias)
    rows = []
    for mv in c.search_model_versions(f"name='{model_name}'"):
        t = mv.tags
        if t.get("share.discarded") == "true":  # published by an update that was discarded after a crash
            continue
        rows.append(
            {
                "version": t.get("share.version"),
                "model_version": str(mv.version),
                "aliases": sorted(by_mv.get(str(mv.version), [])),
                "task": t.get("share.task"),
                "parent": t.get("share.parent"),
                "acc": t.get("acc") or None,
                "bwt": t.get("bwt") or None,
                "gate": t.get("gate.passed"),
                "source": mv.source,
            }
        )
    return sorted(rows, key=lambda r: int(r["model_version"]))


def champion_version(reg: Registry) -> str | None:
    """The Share version id `champion` points at (None when unset)."""
    return _alias_version(reg.client(), reg.model_name, CHAMPION)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def versions(
    model_name: str = DEFAULT_MODEL_NAME, workspace: Path = typer.Option(Path(".")), tracking_uri: str | None = None
) -> None:
    """Print the registered versions as JSON."""
    typer.echo(json.dumps(list_versions(Registry(Workspace(workspace), model_name, tracking_uri)), indent=2))


if __name__ == "__main__":
    app()
