"""The journal of an update: one landing's changes across five systems (workspace, DVC + git,
MLflow, HEAD, the bucket's status) as one resumable transaction.

    journal/<id>.json   id = sha256 of the landing's provenance ({"key", "etag"} or a batch)
    {"provenance", "kind", "version", "parent", "status": "open" | "published" | "discarded",
     "steps": {step: {"at", ...what the step produced}}, "started": step | null,
     "flow_runs": [ids of the runs that worked on it], "history": [...]}

The planned version and its parent are fixed when the journal is opened; each step is written
as started before it acts and as done after, atomically. Every step is idempotent and checks
the real system before acting (the flows call pipelines.register/lineage functions that do),
so a re-run resumes after the last step done. A journal whose parent is no longer HEAD (and
that has not moved HEAD itself) is stale: it is discarded, never published.

Fault injection for tests: with SHARE_FAULT_AFTER=<step> the process kills itself (SIGKILL)
right after that step is journaled as done — the crash points the recovery must survive; the
flows add points before the journal exists (`fault_point("lock")`: the chain is held, nothing
downloaded or journaled yet).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .workspace import Workspace, write_atomic

STEPS = (
    "validate",
    "ingest",
    "build",
    "stage",
    "evaluate",
    "lineage",
    "run",
    "model_version",
    "alias",
    "head",
    "push",
    "ledger",
    "mark",
)
ROLLBACK = "rollback"  # the kind of a rollback's journal, whose steps are these:
ROLLBACK_STEPS = ("checkout", "run", "champion", "head")
OPEN, PUBLISHED, DISCARDED = "open", "published", "discarded"
FAULT_ENV = "SHARE_FAULT_AFTER"
FAULT_ONCE_ENV = "SHARE_FAULT_ONCE"


def fault_point(name: str) -> None:
    """Die here (SIGKILL) when SHARE_FAULT_AFTER names this point (tests only). With
    SHARE_FAULT_ONCE=<file> only while that file exists, and the first to die removes it (a
    served chain whose every run would otherwise die the same way)."""
    if os.environ.get(FAULT_ENV) != name:
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            os.unlink(once)
        except FileNotFoundError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def journal_id(provenance: dict) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class JournalRecord:
    """The journal file, typed (the JSON above, field for field; unknown fields are kept)."""

    provenance: dict  # {"key", "etag"} of one landing, or {"batch": ["key@etag", …]}
    kind: str  # dataset | adapter
    version: str  # the version this update plans
    parent: str | None  # HEAD when it was opened
    status: str = OPEN  # open | published | discarded
    steps: dict[str, dict] = field(default_factory=dict)  # step → {"at", …what it produced}
    started: str | None = None  # the step about to act (None between steps)
    flow_runs: list[str] = field(default_factory=list)  # the Prefect runs that worked on it
    opened: str = ""
    history: list[dict] = field(default_factory=list)  # earlier journals of the same landing
    before: dict[str, dict] = field(default_factory=dict)  # step → what its undo restores
    closed: str | None = None
    reason: str | None = None  # why it was discarded
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> JournalRecord:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known}
        )

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for optional in ("before", "closed", "reason"):  # absent until used, as before
            if not out[optional]:
                del out[optional]
        return {**self.extra, **out}

    @property
    def key(self) -> str | None:
        """The landing's storage key (None for a batch)."""
        return self.provenance.get("key")

    @property
    def batch(self) -> list[str]:
        """The batch's "key@etag" items ([] for a single landing)."""
        return list(self.provenance.get("batch", []))

    @property
    def last_step(self) -> str | None:
        """The furthest step done (steps run in STEPS order; timestamps have one-second resolution)."""
        order = ROLLBACK_STEPS if self.kind == ROLLBACK else STEPS
        return max(self.steps, key=lambda s: order.index(s) if s in order else -1, default=None)


@dataclass
class Journal:
    """One landing's update: its file and its typed record; every change is written before return."""

    path: Path
    record: JournalRecord

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def _read(cls, path: Path) -> Journal:
        return cls(path, JournalRecord.from_json(json.loads(path.read_text())))

    @classmethod
    def find(cls, ws: Workspace, provenance: dict) -> Journal | None:
        path = ws.journals / f"{journal_id(provenance)}.json"
        return cls._read(path) if path.is_file() else None

    @classmethod
    def open(
        cls, ws: Workspace, provenance: dict, kind: str, version: str, parent: str | None, flow_run: str | None = None
    ) -> Journal:
        """A new journal planning `version` on `parent` (an earlier closed journal of the same
        landing is kept in its history)."""
        old = cls.find(ws, provenance)
        history = (
            old.record.history + [{"version": old.version, "parent": old.parent, "status": old.status}] if old else []
        )
        j = cls(
            ws.journals / f"{journal_id(provenance)}.json",
            JournalRecord(
                provenance=provenance,
                kind=kind,
                version=version,
                parent=parent,
                flow_runs=[flow_run] if flow_run else [],
                opened=_now(),
                history=history,
            ),
        )
        j._write()
        return j

    @classmethod
    def open_journals(cls, ws: Workspace, rollbacks: bool = False) -> list[Journal]:
        """The open journals of updates (with `rollbacks`: of rollbacks instead)."""
        if not ws.journals.is_dir():
            return []
        out = [cls._read(p) for p in sorted(ws.journals.glob("*.json"))]
        return [j for j in out if j.status == OPEN and (j.kind == ROLLBACK) == rollbacks]

    # ---- state ------------------------------------------------------------------------------
    @property
    def provenance(self) -> dict:
        return self.record.provenance

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def version(self) -> str:
        return self.record.version

    @property
    def parent(self) -> str | None:
        return self.record.parent

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def flow_runs(self) -> list[str]:
        return list(self.record.flow_runs)

    def done(self, step: str) -> bool:
        return step in self.record.steps

    def result(self, step: str) -> dict:
        return self.record.steps.get(step, {})

    def before(self, step: str) -> dict:
        """What `step` recorded before it acted (its undo's input)."""
        return self.record.before.get(step, {})

    def resumable(self, head: str | None) -> bool:
        """It may still finish: its parent is still HEAD (nothing else was published since), or
        HEAD is its version, or it moved HEAD once (then its version was published and later
        versions may be built on it: only the steps after HEAD remain, and they never move it)."""
        return self.status == OPEN and (head in (self.parent, self.version) or self.done("head"))

    def join(self, flow_run: str | None) -> list[str]:
        """Record that `flow_run` works on this journal now; return the runs before it."""
        before = [r for r in self.record.flow_runs if r != flow_run]
        if flow_run and flow_run not in self.record.flow_runs:
            self.record.flow_runs.append(flow_run)
            self._write()
        return before

    # ---- steps ------------------------------------------------------------------------------
    def begin(self, step: str, **before) -> None:
        """Journal that `step` is about to act (with what it needs to undo, e.g. aliases before)."""
        if step not in (ROLLBACK_STEPS if self.kind == ROLLBACK else STEPS):
            raise ValueError(f"unknown journal step {step!r}")
        self.record.started = step
        if before:  # the first attempt's view: a resumed step must not record its own effects as "before"
            self.record.before.setdefault(step, before)
        self._write()

    def finish(self, step: str, **result) -> None:
        self.record.steps[step] = {"at": _now(), **result}
        self.record.started = None
        self._write()
        fault_point(step)

    def step(self, name: str, fn, **before) -> dict:
        """Run `fn() -> dict` unless `name` is done; return what it produced (stored on disk)."""
        if not self.done(name):
            self.begin(name, **before)
            self.finish(name, **(fn() or {}))
        return self.result(name)

    def close(self, status: str, reason: str | None = None) -> None:
        self.record.status, self.record.closed = status, _now()
        if reason is not None:
            self.record.reason = reason
        self._write()

    def _write(self) -> None:
        write_atomic(self.path, json.dumps(self.record.to_json(), indent=1, sort_keys=True))


def next_version(ws: Workspace) -> str:
    """The id the next update plans: after every existing version and every version an open
    journal has planned (so a crashed update's id is never handed to another one)."""
    planned = [int(j.version[1:]) for j in Journal.open_journals(ws)]
    last = max([int(v[1:]) for v in ws.version_ids()] + planned + [0])
    return f"v{last + 1:04d}"
