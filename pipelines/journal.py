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
right after that step is journaled as done — the crash points the recovery must survive.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
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
OPEN, PUBLISHED, DISCARDED = "open", "published", "discarded"
FAULT_ENV = "SHARE_FAULT_AFTER"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def journal_id(provenance: dict) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Journal:
    """One landing's update. `data` is the JSON above; every change is written before return."""

    path: Path
    data: dict

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def find(cls, ws: Workspace, provenance: dict) -> Journal | None:
        path = ws.journals / f"{journal_id(provenance)}.json"
        return cls(path, json.loads(path.read_text())) if path.is_file() else None

    @classmethod
    def open(
        cls, ws: Workspace, provenance: dict, kind: str, version: str, parent: str | None, flow_run: str | None = None
    ) -> Journal:
        """A new journal planning `version` on `parent` (an earlier closed journal of the same
        landing is kept in its history)."""
        old = cls.find(ws, provenance)
        history = (
            (old.data.get("history", []) + [{k: old.data[k] for k in ("version", "parent", "status")}]) if old else []
        )
        j = cls(
            ws.journals / f"{journal_id(provenance)}.json",
            {
                "provenance": provenance,
                "kind": kind,
                "version": version,
                "parent": parent,
                "status": OPEN,
                "steps": {},
                "started": None,
                "flow_runs": [flow_run] if flow_run else [],
                "opened": _now(),
                "history": history,
            },
        )
        j._write()
        return j

    @staticmethod
    def open_journals(ws: Workspace) -> list[Journal]:
        if not ws.journals.is_dir():
            return []
        out = [Journal(p, json.loads(p.read_text())) for p in sorted(ws.journals.glob("*.json"))]
        return [j for j in out if j.status == OPEN]

    # ---- state ------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.data["version"]

    @property
    def parent(self) -> str | None:
        return self.data["parent"]

    @property
    def status(self) -> str:
        return self.data["status"]

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def result(self, step: str) -> dict:
        return self.data["steps"].get(step, {})

    def resumable(self, head: str | None) -> bool:
        """It may still finish: its parent is still HEAD (nothing else was published since), or
        HEAD is its version, or it moved HEAD once (then its version was published and later
        versions may be built on it: only the steps after HEAD remain, and they never move it)."""
        return self.status == OPEN and (head in (self.parent, self.version) or self.done("head"))

    def join(self, flow_run: str | None) -> list[str]:
        """Record that `flow_run` works on this journal now; return the runs before it."""
        before = [r for r in self.data["flow_runs"] if r != flow_run]
        if flow_run and flow_run not in self.data["flow_runs"]:
            self.data["flow_runs"].append(flow_run)
            self._write()
        return before

    # ---- steps ------------------------------------------------------------------------------
    def begin(self, step: str, **before) -> None:
        """Journal that `step` is about to act (with what it needs to undo, e.g. aliases before)."""
        if step not in STEPS:
            raise ValueError(f"unknown journal step {step!r}")
        self.data["started"] = step
        if before:  # the first attempt's view: a resumed step must not record its own effects as "before"
            self.data.setdefault("before", {}).setdefault(step, before)
        self._write()

    def finish(self, step: str, **result) -> None:
        self.data["steps"][step] = {"at": _now(), **result}
        self.data["started"] = None
        self._write()
        if os.environ.get(FAULT_ENV) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def step(self, name: str, fn, **before) -> dict:
        """Run `fn() -> dict` unless `name` is done; return what it produced (stored on disk)."""
        if not self.done(name):
            self.begin(name, **before)
            self.finish(name, **(fn() or {}))
        return self.result(name)

    def close(self, status: str, **info) -> None:
        self.data.update(status=status, closed=_now(), **info)
        self._write()

    def _write(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def next_version(ws: Workspace) -> str:
    """The id the next update plans: after every existing version and every version an open
    journal has planned (so a crashed update's id is never handed to another one)."""
    planned = [int(j.version[1:]) for j in Journal.open_journals(ws)]
    last = max([int(v[1:]) for v in ws.version_ids()] + planned + [0])
    return f"v{last + 1:04d}"
