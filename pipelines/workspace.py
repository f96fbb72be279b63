"""The workspace: one directory (a git + DVC repo) that holds a continual chain's local state.

    <root>/
      landings/<task>/        ingested copies of landings (DVC-tracked inputs of a version)
      versions/vNNNN/         immutable subspace versions (share_core.state format)
      HEAD                    the version the next update builds on (moved by rollback)
      ledger.json             every landing's outcomes, a history per (storage key, ETag):
                              {"format": 2, "landings": {key: [{"etag", "status", "version"|"reason", "at"}, …]}}
                              (the first format, {key: {"etag", "status", …}}, is still read)
      ledger.log              the outcomes recorded since ledger.json was last rewritten, one JSON
                              line each ({"key", "record"}): a landing appends one line instead of
                              rewriting every landing's history; every LEDGER_COMPACT_EVERY lines
                              they are folded into ledger.json
      mlflow.db, mlartifacts/ the embedded MLflow store (sqlite + file artifacts)
      dvc.yaml, params.yaml   the chain's lineage (pipelines.lineage)
Every writer replaces files atomically (write to a temp file, then os.replace).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

VERSION_ID = re.compile(r"^v\d{4,}$")
VERSION_TEXT = re.compile(r"^[vV]?(\d{1,9})$")
LEDGER_FORMAT = 2
PROCESSED = "processed"
MAX_REASON = 500  # characters of a rejection reason kept in the ledger and the status file
MAX_HISTORY = 50  # non-processed records kept per key (processed ones are always kept)
LEDGER_COMPACT_EVERY = 256  # ledger.log lines before they are folded into ledger.json
# the MLflow registered model a chain's versions go to unless told otherwise (pipelines.register.Registry);
# here, not in pipelines.register, so that the CLI reads it without importing torch and MLflow
DEFAULT_MODEL_NAME = "share-subspace"


def bound_text(text: str, limit: int = MAX_REASON) -> str:
    """`text` cut to at most `limit` characters, ending with an ellipsis when it was cut."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class VersionIdError(ValueError):
    """A version id that is malformed or names no existing version; the message lists them."""


def parse_version_id(text: str, existing: list[str] | None = None) -> str:
    """Normalise a user's version id ("v3", "3", "v0003" → "v0003"); with `existing`, it must
    be one of them. Anything else ("latest", "../v0001", "v0099" when absent) raises
    VersionIdError with one line that lists the existing versions."""
    known = sorted(set(existing or []), key=lambda v: (len(v), v))
    shown = ", ".join(known) if len(known) <= 12 else ", ".join(known[:5] + ["…"] + known[-6:])
    listing = f"existing versions: {shown}" if known else "no versions exist yet"
    m = VERSION_TEXT.match(str(text).strip())
    if not m:
        raise VersionIdError(f"{bound_text(repr(text), 60)} is not a version id (use v3, 3 or v0003); {listing}")
    version = f"v{int(m.group(1)):04d}"
    if existing is not None and version not in known:
        raise VersionIdError(f"version {version} does not exist; {listing}")
    return version


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def landings(self) -> Path:
        return self.root / "landings"

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def journals(self) -> Path:
        """journal/<id>.json: one per update in flight or done (pipelines.journal)."""
        return self.root / "journal"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations"

    @property
    def head_metrics_path(self) -> Path:
        """evaluations/metrics.json: HEAD's ACC/BWT (`dvc metrics show`)."""
        return self.evaluations / "metrics.json"

    @property
    def history_path(self) -> Path:
        """evaluations/history.csv: one row per HEAD move (`dvc plots show`)."""
        return self.evaluations / "history.csv"

    @property
    def heatmap_path(self) -> Path:
        """evaluations/heatmap.png: HEAD's picture (`dvc plots show`)."""
        return self.evaluations / "heatmap.png"

    def evaluation_path(self, version: str) -> Path:
        """evaluations/<version>.json: the version's scores and certificates (pipelines.evaluate)."""
        self.version_dir(version)  # validates the id
        return self.evaluations / f"{version}.json"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.json"

    @property
    def ledger_log_path(self) -> Path:
        return self.root / "ledger.log"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_uri(self) -> str:
        return (self.root / "mlartifacts").as_uri()

    def version_dir(self, version: str) -> Path:
        if not VERSION_ID.match(version):
            raise ValueError(f"version id {version!r} must look like v0001")
        return self.versions / version

    def version_ids(self) -> list[str]:
        if not self.versions.is_dir():
            return []
        return sorted(
            p.name for p in self.versions.iterdir() if VERSION_ID.match(p.name) and (p / "manifest.json").is_file()
        )

    def next_version_id(self) -> str:
        ids = self.version_ids()
        return f"v{(int(ids[-1][1:]) + 1 if ids else 1):04d}"

    def head(self) -> str | None:
        """The version the next update builds on (None: the chain is empty)."""
        p = self.root / "HEAD"
        return p.read_text().strip() or None if p.is_file() else None

    def set_head(self, version: str) -> None:
        if not (self.version_dir(version) / "manifest.json").is_file():
            raise ValueError(f"version {version} does not exist in {self.versions}")
        write_atomic(self.root / "HEAD", version + "\n")

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock on the chain: updates, absorbs and rollbacks never interleave, whichever
        process or deployment runs them (deployment concurrency limits are per deployment)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- the ledger: what happened to each landing, a history per (key, ETag) ------------------
    def ledger_history(self) -> dict[str, list[dict]]:
        """{storage key: [records, oldest first]}; each record has "etag", "status" and
        "version" (processed) or "reason" (rejected). Reads both ledger formats, then replays
        ledger.log (a line torn by a crash is skipped: its outcome was never acknowledged)."""
        return self._read_ledger()[0]

    def _read_ledger(self) -> tuple[dict[str, list[dict]], bytes]:
        """(the history, the ledger.log bytes still to fold: b"" when ledger.json already holds
        them, i.e. a fold was interrupted before it removed the log)."""
        history: dict[str, list[dict]] = {}
        data = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        if isinstance(data, dict) and data.get("format") == LEDGER_FORMAT and isinstance(data.get("landings"), dict):
            history = {k: list(v) for k, v in data["landings"].items()}
        else:
            history = {k: [v] for k, v in data.items() if isinstance(v, dict)}  # format 1: {key: record}
        log = self.ledger_log_path.read_bytes() if self.ledger_log_path.is_file() else b""
        if log and data.get("folded") == hashlib.sha256(log).hexdigest():
            return history, b""
        for line in log.splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            _fold(history, item["key"], item["record"])
        return history, log

    def ledger(self) -> dict[str, dict]:
        """{storage key: its latest record} (the view of the first ledger format)."""
        return {k: dict(v[-1]) for k, v in self.ledger_history().items() if v}

    def landing_history(self, key: str) -> list[dict]:
        return self.ledger_history().get(key, [])

    def processed_record(self, key: str, etag: str) -> dict | None:
        """The record of the landing (key, etag) that built a version, or None."""
        return _processed(self.landing_history(key), etag)

    def seen(self, key: str, etag: str) -> dict | None:
        """What happened to the landing (key, etag): its processed record if one exists (a later
        rejection never hides it), else its latest record, else None (never seen)."""
        return _seen(self.landing_history(key), etag)

    def record_landing(self, key: str, entry: dict) -> dict:
        """Append the outcome `entry` ({"etag", "status", "version"|"reason"}) to the key's
        history and return the landing's record as `seen` then gives it. A processed record is
        never replaced: a rejection of a (key, ETag) that already built a version is dropped.
        Recording the same outcome again moves it to the end instead of repeating it. Writers
        hold the chain lock (flows.lock), so appends and the fold into ledger.json never race."""
        if not isinstance(entry.get("etag"), str) or not isinstance(entry.get("status"), str):
            raise ValueError(f"a ledger record needs 'etag' and 'status' strings, got {sorted(entry)}")
        history, log = self._read_ledger()
        if not log:
            self.ledger_log_path.unlink(missing_ok=True)  # absent, or folded by a fold that was interrupted
        if entry["status"] != PROCESSED and _processed(history.get(key, []), entry["etag"]):
            return _processed(history[key], entry["etag"])
        record = {**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if "reason" in record:
            record["reason"] = bound_text(record["reason"])
        _fold(history, key, record)
        if not self.ledger_path.is_file() or log.count(b"\n") + 1 >= LEDGER_COMPACT_EVERY:
            body = {"format": LEDGER_FORMAT, "landings": history, "folded": hashlib.sha256(log).hexdigest()}
            write_atomic(self.ledger_path, json.dumps(body, indent=1, sort_keys=True))
            self.ledger_log_path.unlink(missing_ok=True)
        else:
            with open(self.ledger_log_path, "ab") as f:
                if log and not log.endswith(b"\n"):
                    f.write(b"\n")  # after a torn line: never glue a new record onto it
                f.write(json.dumps({"key": key, "record": record}, sort_keys=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return _seen(history[key], entry["etag"])


def _same(a: dict, b: dict) -> bool:
    return all(a.get(f) == b.get(f) for f in ("etag", "status", "version", "reason"))


def _fold(history: dict[str, list[dict]], key: str, record: dict) -> None:
    """Add `record` to the key's history: an equal outcome moves to the end, and only the last
    MAX_HISTORY non-processed records are kept (processed ones always are)."""
    records = [r for r in history.get(key, []) if not _same(r, record)] + [record]
    others = [i for i, r in enumerate(records) if r.get("status") != PROCESSED]
    drop = set(others[:-MAX_HISTORY]) if len(others) > MAX_HISTORY else set()
    history[key] = [r for i, r in enumerate(records) if i not in drop]


def _processed(records: list[dict], etag: str) -> dict | None:
    hits = [r for r in records if r.get("etag") == etag and r.get("status") == PROCESSED]
    return dict(hits[-1]) if hits else None


def _seen(records: list[dict], etag: str) -> dict | None:
    hits = [r for r in records if r.get("etag") == etag]
    return _processed(records, etag) or (dict(hits[-1]) if hits else None)
