"""The chain's lock: versions form a chain, so updates, absorbs and rollbacks of one workspace
never interleave — across processes *and* machines.

Two guards, taken in order: a Prefect global concurrency limit of 1 named after the chain
(held on the Prefect server, so workers on other hosts that mount the same workspace honour it;
its lease is renewed while held and expires LEASE_SECONDS after a holder dies), then the
workspace's own `fcntl` lock (released by the kernel when a process dies; it alone guards a
workspace without a Prefect API). SHARE_CHAIN_LOCK=local keeps only the second guard (a single
machine, or tests that kill holders on purpose).

A dead holder does not block the chain for a lease: the holder writes its lease id, host, pid
and flow run to `<workspace>/.chain-lease.json`, and the next acquirer on that host releases the
lease of a holder whose process is gone before it asks for the slot (a holder on another host is
waited for until its lease expires); once it holds the chain it ends the dead holder's flow run
(and its subflows) Crashed — also a run killed before its update's journal existed (the local
mode keeps the same record). Transient Prefect API faults (5xx, connection errors) while
acquiring are retried with backoff for ACQUIRE_RETRY_SECONDS; the lease's renewal failing does
not kill the update (the workspace lock still holds the chain on this host).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.concurrency._sync import (
    acquire_concurrency_slots_with_lease,
    release_concurrency_slots_with_lease,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Crashed

from pipelines.workspace import Workspace, write_atomic

LEASE_SECONDS = 60  # Prefect's shortest lease: how long a dead holder on another host blocks the chain
MODE_ENV = "SHARE_CHAIN_LOCK"
LEASE_FILE = ".chain-lease.json"
ACQUIRE_RETRY_SECONDS = float(os.environ.get("SHARE_PREFECT_RETRY_SECONDS", "300"))
log = logging.getLogger(__name__)


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


def limit_name(ws: Workspace) -> str:
    return f"share-chain-{chain_id(ws)}"


def transient(exc: BaseException) -> bool:
    """A fault worth retrying: a 5xx / 408 / 429 from the API or a connection-level error,
    anywhere in the exception's cause chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code >= 500 or exc.response.status_code in (408, 429)
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def with_retries(what: str, fn, *, seconds: float | None = None, first_delay: float = 1.0, max_delay: float = 15.0):
    """`fn()`, retried with exponential backoff (capped at `max_delay`) while it raises a
    transient API fault, for at most `seconds` (default ACQUIRE_RETRY_SECONDS); then the fault
    is raised: the landing stays without outcome and the watcher's reconcile takes it again."""
    deadline = time.monotonic() + (ACQUIRE_RETRY_SECONDS if seconds is None else seconds)
    delay = first_delay
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: transient Prefect API fault (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lease(ws: Workspace) -> dict | None:
    try:
        data = json.loads((ws.root / LEASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("pid") else None


def _dead(data: dict | None) -> bool:
    return bool(data) and data.get("host") == socket.gethostname() and not _pid_alive(int(data.get("pid", 0)))


def dead_holder_lease(ws: Workspace) -> str | None:
    """The lease id recorded by a holder on this host whose process is gone, else None."""
    data = _read_lease(ws)
    return str(data["lease_id"]) if _dead(data) and data.get("lease_id") else None


def release_dead_holder(ws: Workspace) -> bool:
    """Release the chain slot a dead holder on this host still leases (idempotent: the server
    ignores a lease it no longer knows). True when one was released. The record stays for
    `_end_dead_holder`, which runs once the chain is held."""
    lease = dead_holder_lease(ws)
    if lease is None:
        return False

    with_retries("release a dead holder's chain lease", lambda: release_concurrency_slots_with_lease(UUID(lease)))
    log.warning("released the chain slot of a dead holder (lease %s)", lease)
    return True


def crash_runs(run_ids: list[str], message: str) -> list[str]:
    """End these flow runs and their subflows Crashed where the server still shows them
    Pending/Running (their process is gone); returns the ids ended."""
    if not run_ids:
        return []

    def crash() -> list[str]:
        ended = []
        with get_client(sync_client=True) as client:
            runs = []
            for rid in run_ids:
                try:
                    runs.append(client.read_flow_run(rid))
                except Exception:  # noqa: BLE001 - a run the server no longer knows needs no marking
                    continue
            if runs:
                parents = FlowRunFilterParentFlowRunId(any_=[r.id for r in runs])
                runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parents))
            for run in runs:
                if run.state is not None and (run.state.is_running() or run.state.is_pending()):
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    ended.append(str(run.id))
        return ended

    return with_retries("end crashed flow runs", crash, seconds=30)


def _end_dead_holder(ws: Workspace) -> None:
    """Holding the chain: a holder on record that is not alive died holding it; its flow run
    ends Crashed (best effort: the run is for people, the chain is already safe)."""
    data = _read_lease(ws)
    if not data or data.get("host") != socket.gethostname() or _pid_alive(int(data.get("pid", 0))):
        return
    if data.get("flow_run"):
        try:
            crash_runs([data["flow_run"]], "the process holding the chain died; a later holder took over")
        except Exception as e:  # noqa: BLE001
            log.warning("could not end the dead holder's flow run %s: %s", data["flow_run"], e)


def _flow_run_id() -> str | None:
    return flow_run.id


def _hold(ws: Workspace, lease: str | None) -> None:
    """Record this process as the chain's holder (after ending a dead predecessor's run)."""
    _end_dead_holder(ws)
    record = {"lease_id": lease, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    with contextlib.suppress(Exception):  # outside a flow run there is none
        record["flow_run"] = _flow_run_id()
    write_atomic(ws.root / LEASE_FILE, json.dumps(record))


def _unhold(ws: Workspace) -> None:
    with contextlib.suppress(FileNotFoundError):
        if (_read_lease(ws) or {}).get("pid") == os.getpid():
            (ws.root / LEASE_FILE).unlink()


def reset_stale_slots(ws: Workspace) -> bool:
    """At `share serve` start, with no live holder on record: a slot the chain's limit still
    counts (its lease was lost with a Prefect server restart, or its holder died) is freed.
    True when the limit was reset."""
    if os.environ.get(MODE_ENV, "prefect") == "local":
        return False
    release_dead_holder(ws)
    data = _read_lease(ws)
    if data is not None and not _dead(data):  # a live holder, or one on another host: its lease decides
        return False

    name = limit_name(ws)

    def reset() -> bool:
        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                return False
            if limit.active_slots <= 0:
                return False
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
            return True

    done = with_retries("reset the chain's stale slots", reset)
    if done:
        log.warning("reset the chain limit %s: its slot had no live holder", name)
    return done


@contextlib.contextmanager
def chain_lock(ws: Workspace):
    """Hold the chain: the Prefect global concurrency limit, then the local lock."""
    if os.environ.get(MODE_ENV, "prefect") == "local":
        with ws.lock():
            _hold(ws, None)
            try:
                yield
            finally:
                _unhold(ws)
        return

    name = limit_name(ws)
    with_retries("create the chain's concurrency limit", lambda: _ensure_limit(name))
    release_dead_holder(ws)
    lease = with_retries(
        "acquire the chain's concurrency slot",
        lambda: acquire_concurrency_slots_with_lease([name], 1, lease_duration=LEASE_SECONDS, strict=True),
    ).lease_id
    try:
        with maintain_concurrency_lease(lease, LEASE_SECONDS, raise_on_lease_renewal_failure=False):
            with ws.lock():
                _hold(ws, str(lease))
                try:
                    yield
                finally:
                    _unhold(ws)
    finally:
        try:
            with_retries("release the chain's slot", lambda: release_concurrency_slots_with_lease(lease), seconds=60)
        except Exception as e:  # noqa: BLE001 - the lease expires by itself within LEASE_SECONDS
            log.warning("could not release the chain's slot (its lease expires in %d s): %s", LEASE_SECONDS, e)


def _ensure_limit(name: str) -> None:
    """The chain's limit (1 slot) exists on the Prefect server; two first workers may race to
    create it, and the loser's conflict is the outcome both wanted."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
