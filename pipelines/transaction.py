"""The update as one transaction over five systems (workspace, DVC + git, MLflow, HEAD, the
bucket's status): its ordered steps, each declaring what it changes, how to find that change in
the real system (*check*), how to make it (*do*) and how a discard takes it back (*undo*).

The journal (pipelines.journal) records the steps; `run` executes them in order, each once:
a step the journal lists as done is skipped; one whose effect the real system already shows (a
crash came between the act and its journal entry) is journaled from its *check* without acting
again; any other step acts. The orchestrator (flows/continual.py) only decides *where* things
run: it passes `execute` (Prefect tasks with retries for the steps that talk to a server) and
the two placements it owns, `Update.build` (in process or a work pool) and `Update.evaluate`
(in process or Dask). The same plan serves a single landing, a batch absorb and its resume.

*undo* touches only what this update built: its version directory must carry its provenance on
its parent, be nobody's parent and not be HEAD (a version another update of the same id built
is never touched). Steps after HEAD are never undone: an update that moved HEAD always resumes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from share_core import state as st

from . import evaluate as ev
from . import lineage, register
from .journal import DISCARDED, ROLLBACK_STEPS, STEPS, Journal, fault_point
from .storage import Landing, open_storage
from .workspace import Workspace


@dataclass
class Update:
    """What every step of one update reads. `registry` is where its version is registered (its
    workspace is `ws`); `build` and `evaluate` are the orchestrator's placements of the two heavy
    steps; `local` maps a landing's key to its downloaded copy (only the ingest step needs it)."""

    ws: Workspace
    journal: Journal
    registry: register.Registry
    storage_url: str = ""
    landings: list[Landing] = field(default_factory=list)
    tolerance: float | None = None
    local: dict[str, str] = field(default_factory=dict)
    build: Callable[[Update], None] | None = None
    evaluate: Callable[[Update], dict] | None = None
    reason: str = ""  # why it is discarded (undo) or rolled back

    @property
    def version(self) -> str:
        return self.journal.version

    @property
    def names(self) -> list[str]:
        """The landings' directories in the workspace (what ingest produced)."""
        return self.journal.result("ingest")["names"]

    def landing_record(self) -> dict:
        """The landing as the MLflow run records it: provenance and task names."""
        return {**self.journal.provenance, "task": ",".join(self.names)}


@dataclass(frozen=True)
class Step:
    name: str
    changes: str  # the system and what in it
    do: Callable[[Update], dict | None]
    check: Callable[[Update], dict | None] | None  # its effect found in the real system; None: `do` re-runs safely
    undo: Callable[[Update], None] | None  # None: kept (content-addressed, history) or never undone
    keeps: str = ""  # why a step without undo keeps its effect
    remote: bool = False  # talks to a server: the orchestrator retries it on transient errors
    before: Callable[[Update], dict] | None = None  # what its undo needs, recorded before it acts


# ---- validate, ingest ---------------------------------------------------------------------------
def landing_name(landing: Landing) -> str:
    return f"{landing.task}-{landing.etag[:8]}"


def ingest(u: Update) -> dict:
    """Move the validated landings into the workspace (DVC tracks them with the version's stage)."""
    names = []
    for landing in u.landings:
        name = landing_name(landing)
        dest = u.ws.landings / name
        if not dest.exists():
            u.ws.landings.mkdir(parents=True, exist_ok=True)
            tmp = u.ws.landings / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(u.local[landing.key], tmp)
            tmp.rename(dest)
        names.append(name)
    return {"names": names}


def _ingested(u: Update) -> dict | None:
    names = [landing_name(lnd) for lnd in u.landings]
    return {"names": names} if names and all((u.ws.landings / n).is_dir() for n in names) else None


# ---- build ----------------------------------------------------------------------------------------
def _build(u: Update) -> dict:
    u.build(u)
    return {}


def _built(u: Update) -> dict | None:
    """The planned version exists, built from exactly this landing on its parent (a crash after
    the build, before the journal recorded it): reused, never rebuilt or duplicated."""
    vdir = u.ws.version_dir(u.version)
    if not (vdir / "manifest.json").is_file():
        return None
    m = st.read_manifest(vdir)
    if m.provenance != u.journal.provenance or m.parent != u.journal.parent:
        raise FileExistsError(
            f"versions/{u.version} exists but was built from {m.provenance} on {m.parent}, not this update"
        )
    return {}


def _remove_version(u: Update) -> None:
    shutil.rmtree(u.ws.version_dir(u.version), ignore_errors=True)


# ---- DVC stage, evaluation, git -------------------------------------------------------------------
def _stage(u: Update) -> dict:
    j = u.journal
    lineage.add_version_stage(u.ws.root, u.version, u.names, j.kind, j.parent)
    return {}


def _staged(u: Update) -> dict | None:
    return {} if lineage.locked_stage(u.ws.root, u.version) else None


def _evaluate(u: Update) -> dict:
    return _scores(u.evaluate(u))


def _evaluated(u: Update) -> dict | None:
    rec = ev.read_record(u.ws, u.version)
    return _scores(rec) if rec is not None else None


def _scores(record: ev.EvaluationRecord) -> dict:
    return {"acc": record.acc, "bwt": record.bwt}


def _commit(u: Update) -> dict:
    return lineage.record_version(u.ws.root, u.version, f"{u.version}: {','.join(u.names)}")


# ---- MLflow ---------------------------------------------------------------------------------------
def _log_run(u: Update) -> dict:
    lin = u.journal.result("lineage")
    gate = register.gate_for(u.registry, u.version, tolerance=u.tolerance)
    run_id = register.log_run(
        u.registry,
        u.version,
        landing=u.landing_record(),
        lineage={k: lin[k] for k in ("git_rev", "dvc_stage", "dvc_hashes")},
        gate=gate,
    )
    return {"gate": gate, "run_id": run_id}


def _logged(u: Update) -> dict | None:
    run_id = register.finished_run(u.registry, u.version)
    if run_id is None:
        return None
    gate = register.gate_for(u.registry, u.version, tolerance=u.tolerance)
    return {"gate": gate, "run_id": run_id}


def _register(u: Update) -> dict:
    run = u.journal.result("run")
    mv = register.register_model_version(u.registry, u.version, run["run_id"], gate=run["gate"])
    return {"model_version": mv}


def _registered(u: Update) -> dict | None:
    run_id = u.journal.result("run")["run_id"]
    mv = register.model_version_for_run(u.registry, u.version, run_id)
    return {"model_version": mv} if mv else None


def _promote(u: Update) -> bool:
    return bool(u.journal.result("run")["gate"]["passed"])


def _move_aliases(u: Update) -> dict:
    mv = u.journal.result("model_version")["model_version"]
    register.move_aliases(u.registry, mv, promote=_promote(u))
    return {}


def _aliases_moved(u: Update) -> dict | None:
    mv = u.journal.result("model_version")["model_version"]
    now = register.aliases(u.registry)
    moved = now["candidate"] == mv and (now["champion"] == mv or not _promote(u))
    return {} if moved else None


def _aliases_before(u: Update) -> dict:
    return register.aliases(u.registry)


def _discard_in_mlflow(u: Update) -> None:
    """Run, model version and aliases in one pass: only what carries this version's content hash."""
    register.discard_version(
        u.registry,
        u.version,
        st.read_manifest(u.ws.version_dir(u.version)).content_hash,
        aliases_before=u.journal.before("alias") or None,
        reason=u.reason,
    )


# ---- HEAD, remote, outcomes -----------------------------------------------------------------------
def _move_head(u: Update) -> dict:
    register.move_head(u.ws, u.version)  # and what `dvc metrics show` / `dvc plots show` report
    return {}


def _push(u: Update) -> dict:
    lineage.push(u.ws.root, [u.version], u.names)
    return {}


def _record_outcomes(u: Update) -> dict:
    for lnd in u.landings:
        u.ws.record_landing(lnd.key, {"etag": lnd.etag, "status": "processed", "version": u.version})
    return {}


def _outcomes_recorded(u: Update) -> dict | None:
    seen = [u.ws.seen(lnd.key, lnd.etag) or {} for lnd in u.landings]
    return {} if all(s.get("status") == "processed" and s.get("version") == u.version for s in seen) else None


def _mark_bucket(u: Update) -> dict:
    storage = open_storage(u.storage_url)
    for lnd in u.landings:
        storage.mark(lnd, "processed", {"version": u.version})
    return {}


def _bucket_marked(u: Update) -> dict | None:
    storage = open_storage(u.storage_url)
    marks = [storage.status_of(lnd) or {} for lnd in u.landings]
    return {} if all(m.get("status") == "processed" and m.get("version") == u.version for m in marks) else None


def _nothing(u: Update) -> dict:
    return {}


PLAN = (
    Step("validate", "nothing (checked against HEAD before the journal opens)", _nothing, None, None, "nothing made"),
    Step("ingest", "landings/<task>-<etag>", ingest, _ingested, None, "content-addressed, harmless"),
    Step("build", "versions/<v>", _build, _built, _remove_version),
    Step(
        "stage",
        "lineage/<v>/dvc.yaml + dvc.lock: the stages of <v> and its landings",
        _stage,
        _staged,
        lambda u: lineage.remove_version_stage(u.ws.root, u.version),
    ),
    Step("evaluate", "evaluations/<v>.json", _evaluate, _evaluated, lambda u: ev.remove_record(u.ws, u.version)),
    Step("lineage", "a git commit of the stage", _commit, None, None, "history", remote=True),
    Step("run", "MLflow run of <v>", _log_run, _logged, _discard_in_mlflow, remote=True),
    Step(
        "model_version",
        "MLflow model version of <v>",
        _register,
        _registered,
        None,
        "discarded with the run",
        remote=True,
    ),
    Step(
        "alias",
        "candidate/champion aliases",
        _move_aliases,
        _aliases_moved,
        None,
        "moved back with the run",
        remote=True,
        before=_aliases_before,
    ),
    Step("head", "HEAD", _move_head, None, None, "never undone: an update that moved HEAD always resumes"),
    Step("push", "DVC remote", _push, None, None, "content-addressed", remote=True),
    Step("ledger", "ledger.json outcome", _record_outcomes, _outcomes_recorded, None, "after HEAD"),
    Step("mark", "the bucket's status file", _mark_bucket, _bucket_marked, None, "after HEAD", remote=True),
)
assert tuple(s.name for s in PLAN) == STEPS, "the plan and the journal's steps must agree"
LAND = PLAN[:2]  # validate, ingest: the landings into the workspace (a batch validates several first)
PUBLISH = PLAN[2:]  # build … mark


# ---- a rollback: the same runner, its own steps (journal kind "rollback") ----------------------------
def _checkout(u: Update) -> dict:
    lineage.checkout_version(u.ws.root, u.version)  # pulled from the DVC remote when it was removed
    return {}


def _record_rollback(u: Update) -> dict:
    previous = u.journal.provenance.get("from")
    rid = u.journal.path.stem
    return {
        "run_id": register.record_rollback(u.registry, u.version, previous=previous, reason=u.reason, rollback_id=rid)
    }


def _rollback_recorded(u: Update) -> dict | None:
    run_id = register.rollback_recorded(u.registry, u.journal.path.stem)
    return {"run_id": run_id} if run_id else None


def _point_champion(u: Update) -> dict:
    register.point_champion(u.registry, u.version, u.journal.result("run")["run_id"])
    return {}


ROLLBACK = (
    Step("checkout", "versions/<v> present (pulled from the DVC remote)", _checkout, None, None, "a restored copy"),
    Step(
        "run",
        "an MLflow run recording the rollback",
        _record_rollback,
        _rollback_recorded,
        None,
        "history",
        remote=True,
    ),
    Step(
        "champion",
        "the champion alias",
        _point_champion,
        lambda u: {} if register.champion_is(u.registry, u.version) else None,
        None,
        "a later rollback moves it",
        remote=True,
    ),
    Step("head", "HEAD", _move_head, lambda u: {} if u.ws.head() == u.version else None, None, "as above"),
)
assert tuple(s.name for s in ROLLBACK) == ROLLBACK_STEPS, "the rollback plan and its journal's steps must agree"


def _direct(step: Step, u: Update) -> dict | None:
    return step.do(u)


def run(
    u: Update, steps: Sequence[Step] = PUBLISH, execute: Callable[[Step, Update], dict | None] = _direct
) -> dict[str, float]:
    """Run `steps` in order, each exactly once across crashes (see the module's docstring);
    return the wall seconds each took in this call."""
    seconds = {}
    for step in steps:
        t0 = time.perf_counter()
        j = u.journal
        if not j.done(step.name):
            j.begin(step.name, **(step.before(u) if step.before else {}))  # the first attempt's view is kept
            found = step.check(u) if step.check else None
            if found is None:
                found = execute(step, u) or {}
                fault_point(f"acted:{step.name}")  # tests: a crash between the act and its journal entry
            j.finish(step.name, **found)
        seconds[step.name] = time.perf_counter() - t0
    return seconds


# ---- discard ----------------------------------------------------------------------------------------
def built_by(ws: Workspace, j: Journal) -> st.Manifest | None:
    """The manifest of `j`'s version when this update built it and nothing depends on it
    (its provenance on its parent, not HEAD, nobody's parent); else None."""
    vdir = ws.version_dir(j.version)
    if not (vdir / "manifest.json").is_file():
        return None
    built = st.read_manifest(vdir)
    if built.provenance != j.provenance or built.parent != j.parent or ws.head() == j.version:
        return None
    for v in ws.version_ids():
        if v != j.version and st.read_manifest(ws.version_dir(v)).parent == j.version:
            return None
    return built


def undo(reg: register.Registry, j: Journal, *, reason: str) -> bool:
    """Discard a stale update of `reg`'s workspace: every step's undo, last step first — also
    those the journal does not list as done (the crash may have come between a step and its
    entry) — then close the journal DISCARDED with the reason. True when something it built was
    removed."""
    built = built_by(reg.ws, j) is not None
    if built:
        u = Update(ws=reg.ws, journal=j, registry=reg, reason=reason)
        for step in reversed(PLAN):
            if step.undo is not None:
                step.undo(u)
    j.close(DISCARDED, reason=reason)
    return built
