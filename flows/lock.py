"""The chain's lock: versions form a chain, so updates, absorbs and rollbacks of one workspace
never interleave — across processes *and* machines.

Two guards, taken in order: a Prefect global concurrency limit of 1 named after the chain
(held on the Prefect server, so workers on other hosts that mount the same workspace honour it;
its lease is renewed while held and expires LEASE_SECONDS after a holder dies), then the
workspace's own `fcntl` lock (released by the kernel when a process dies; it alone guards a
workspace without a Prefect API). SHARE_CHAIN_LOCK=local keeps only the second guard (a single
machine, or tests that kill holders on purpose and cannot wait for a lease to expire).
"""

from __future__ import annotations

import contextlib
import os
import uuid

from pipelines.workspace import Workspace

LEASE_SECONDS = 60  # Prefect's shortest lease: how long a dead holder blocks the chain
MODE_ENV = "SHARE_CHAIN_LOCK"


def chain_id(ws: Workspace) -> str:
    """The chain's name, the same on every machine that mounts the workspace (kept in it)."""
    path = ws.root / ".chain-id"
    if not path.is_file():
        ws.root.mkdir(parents=True, exist_ok=True)
        tmp = ws.root / f".chain-id.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex[:16] + "\n")
        with contextlib.suppress(FileExistsError):  # a hard link appears whole; of two first writers the first wins
            os.link(tmp, path)
        tmp.unlink()
    return path.read_text().strip()


@contextlib.contextmanager
def chain_lock(ws: Workspace):
    """Hold the chain: the Prefect global concurrency limit, then the local lock."""
    if os.environ.get(MODE_ENV, "prefect") == "local":
        with ws.lock():
            yield
        return
    from prefect.concurrency.sync import concurrency

    name = f"share-chain-{chain_id(ws)}"
    _ensure_limit(name)
    with concurrency(name, occupy=1, lease_duration=LEASE_SECONDS, strict=True):
        with ws.lock():
            yield


def _ensure_limit(name: str) -> None:
    """The chain's limit (1 slot) exists on the Prefect server; two first workers may race to
    create it, and the loser's conflict is the outcome both wanted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
