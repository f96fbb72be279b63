"""The workspace: one directory (a git + DVC repo) that holds a continual chain's local state.

    <root>/
      landings/<task>/        ingested copies of landings (DVC-tracked inputs of a version)
      versions/vNNNN/         immutable subspace versions (share_core.state format)
      HEAD                    the version the next update builds on (moved by rollback)
      ledger.json             processed landings {storage key: {"etag", "status", "version"|"reason"}}
      mlflow.db, mlartifacts/ the embedded MLflow store (sqlite + file artifacts)
      dvc.yaml, params.yaml   the chain's lineage (pipelines.lineage)
Every writer replaces files atomically (write to a temp file, then os.replace).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION_ID = re.compile(r"^v\d{4,}$")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
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
    def evaluations(self) -> Path:
        return self.root / "evaluations"

    def evaluation_path(self, version: str) -> Path:
        """evaluations/<version>.json: the version's scores and certificates (pipelines.evaluate)."""
        self.version_dir(version)  # validates the id
        return self.evaluations / f"{version}.json"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.json"

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
        return sorted(p.name for p in self.versions.iterdir() if VERSION_ID.match(p.name) and (p / "manifest.json").is_file())

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

    def ledger(self) -> dict[str, dict]:
        return json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}

    def record_landing(self, key: str, entry: dict) -> None:
        ledger = self.ledger()
        ledger[key] = entry
        write_atomic(self.ledger_path, json.dumps(ledger, indent=2, sort_keys=True))
