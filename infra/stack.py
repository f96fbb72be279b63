"""The local stack: an S3 server (moto, on disk), an MLflow server and a Prefect server, all bound
to 127.0.0.1.

`up` starts what is not already running (detached, in its own session, so it outlives the CLI
call), waits until each answers its health URL and creates the landing bucket; `down` stops
them; `status` reports them; `env` gives the variables a client exports to use them (`shell_exports`:
as `export` lines for `eval`).
State lives in `data_dir` and survives `down` / `up` and a crash: `<name>.pid`, `logs/<name>.log`,
the MLflow and Prefect sqlite files, MLflow's artifacts (`mlartifacts/`, served by MLflow) and the
S3 buckets (`s3/buckets/`, written through by `infra/s3_server.py` before each response).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"  # Prefect's own
HOST = "127.0.0.1"  # loopback only: the stack has no authentication
# moto accepts any credentials; these dummies keep real ones from ever reaching it.
S3_SERVER = Path(__file__).with_name("s3_server.py")
STATE_FILE = "stack.json"  # the ports and bucket of the last `up`, read by `config`
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class StackError(RuntimeError):
    """A service did not start, or a port is taken by something that is not ours."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses."""

    data_dir: Path = Path(".share-stack")
    s3_port: int = 9100
    mlflow_port: int = 5000
    prefect_port: int = 4200
    bucket: str = "share"
    timeout: float = 90.0  # seconds to wait for each service's health check

    def __post_init__(self) -> None:
        # absolute: the path goes into sqlite URIs and PREFECT_HOME of processes started elsewhere
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())

    @property
    def host(self) -> str:
        return HOST

    def url(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    def pidfile(self, service: str) -> Path:
        return self.data_dir / f"{service}.pid"

    def logfile(self, service: str) -> Path:
        return self.data_dir / "logs" / f"{service}.log"


@dataclass(frozen=True)
class _Service:
    name: str
    port: int
    health: str  # path answered with 200 when ready
    argv: list[str]
    env: dict[str, str]
    marker: str  # a word of its command line: tells our process from a recycled pid


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all bound at once, so they differ), for a stack
    beside others on one machine (tests, the soak)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def config(data_dir: Path = Path(".share-stack"), **ports: int | None) -> StackConfig:
    """The stack of `data_dir`: ports given here win, else those its last `up` recorded in
    `<data_dir>/stack.json`, else the defaults (so `env`/`down`/`status` find a stack started on
    other ports)."""
    data_dir = Path(data_dir).expanduser().resolve()
    try:
        saved = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        saved = {}
    fields = ("s3_port", "mlflow_port", "prefect_port", "bucket")
    chosen = {k: v for k, v in {**{k: saved.get(k) for k in fields}, **ports}.items() if v is not None}
    return StackConfig(data_dir=data_dir, **chosen)


def env(cfg: StackConfig) -> dict[str, str]:
    """What a client exports to use the stack (the AWS values are moto's dummies)."""
    s3 = cfg.url(cfg.s3_port)
    return {
        "MLFLOW_TRACKING_URI": cfg.url(cfg.mlflow_port),
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,
        "PREFECT_API_URL": cfg.url(cfg.prefect_port) + "/api",
        "SHARE_STORAGE": f"s3://{cfg.bucket}/tasks?endpoint_url={s3}",
        **DUMMY_AWS,
    }


def shell_exports(cfg: StackConfig) -> str:
    """`export KEY=value` lines (values shell-quoted, nothing else) that `eval` turns into env(cfg)."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env(cfg).items())


def _services(cfg: StackConfig) -> list[_Service]:
    """In start order; MLflow comes last (after the landing bucket exists)."""
    d, bin_ = cfg.data_dir, Path(sys.executable).parent  # this virtualenv's executables, not PATH's
    base = {**os.environ, **env(cfg), "NO_PROXY": f"{HOST},localhost", "no_proxy": f"{HOST},localhost"}
    # clients' settings, not the servers'; and no real AWS session/profile next to moto's dummies
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        base.pop(var, None)
    prefect_env = {
        "PREFECT_HOME": str(d / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{d / 'prefect' / 'prefect.db'}",
        # concurrency leases on disk (PREFECT_HOME/concurrency_leases), not in the server's memory: a
        # chain slot held across a server restart keeps its lease, so it is released (or expires) as
        # usual instead of being counted as taken forever (the soak found a chain blocked that way)
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
    }
    return [
        _Service(
            "s3",
            cfg.s3_port,
            "/",
            [sys.executable, str(S3_SERVER), "--host", HOST, "--port", str(cfg.s3_port), "--data", str(d / "s3")],
            base,
            "s3_server",
        ),
        _Service(
            "prefect",
            cfg.prefect_port,
            "/api/health",
            [str(bin_ / "prefect"), "server", "start", "--host", HOST, "--port", str(cfg.prefect_port)],
            {**base, **prefect_env},
            "prefect",
        ),
        _Service(
            "mlflow",
            cfg.mlflow_port,
            "/health",
            [
                str(bin_ / "mlflow"),
                "server",
                "--host",
                HOST,
                "--port",
                str(cfg.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{d / 'mlflow.db'}",
                "--artifacts-destination",
                str(d / "mlartifacts"),  # on disk, served (proxied) by MLflow: clients need no S3 for models
            ],
            {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            "mlflow",
        ),
    ]


def _read_pid(cfg: StackConfig, svc: _Service) -> int | None:
    """The recorded pid if that process is still ours and alive, else None."""
    try:
        pid = int(cfg.pidfile(svc.name).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, svc.marker) else None


def _alive(pid: int, marker: str | None = None) -> bool:
    try:  # reap it if it is our own exited child (else it lingers as a zombie that looks alive)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    proc = Path(f"/proc/{pid}")
    if proc.exists():  # Linux: tell zombies and recycled pids apart
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            return marker is None or marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace")
        except OSError:  # it exited while we looked
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # (PermissionError too: alive, if not ours)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    """GET without proxies (a corporate HTTP_PROXY must not see loopback requests)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def _port_free(port: int) -> bool:
    """Bindable as the servers bind it (SO_REUSEADDR: a just-stopped server's TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _start(cfg: StackConfig, svc: _Service) -> int:
    """Start detached (own session: the CLI can exit, and `down` can signal the whole group)."""
    if not Path(svc.argv[0]).exists():
        raise StackError(f"{svc.argv[0]} not found: install the project into this virtualenv first")
    log = cfg.logfile(svc.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # cwd = data_dir: Prefect reads .env/prefect.toml from its cwd; MLflow may write ./mlruns
        proc = subprocess.Popen(
            svc.argv,
            cwd=cfg.data_dir,
            env=svc.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cfg.pidfile(svc.name).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_healthy(cfg: StackConfig, svc: _Service) -> None:
    url, log = cfg.url(svc.port) + svc.health, cfg.logfile(svc.name)
    deadline = time.monotonic() + cfg.timeout
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if _read_pid(cfg, svc) is None:
            raise StackError(f"{svc.name} exited before it was healthy; read {log}:\n{_tail(log)}")
        time.sleep(0.3)
    raise StackError(f"{svc.name} not healthy at {url} after {cfg.timeout:.0f}s; read {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


def _ensure_bucket(cfg: StackConfig) -> None:
    import boto3  # noqa: PLC0415 - boto3 (~0.2 s) only to create the bucket: flows/cli.py imports this module at start-up
    from botocore.exceptions import ClientError  # noqa: PLC0415 - with boto3, above

    s3 = boto3.client(
        "s3",
        endpoint_url=cfg.url(cfg.s3_port),
        region_name=DUMMY_AWS["AWS_DEFAULT_REGION"],
        **{k.lower(): DUMMY_AWS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    )
    try:
        s3.head_bucket(Bucket=cfg.bucket)
    except ClientError:
        s3.create_bucket(Bucket=cfg.bucket)


def _stop(cfg: StackConfig, services: list[_Service], grace: float = 15.0) -> None:
    """SIGTERM each service's process group (all at once: shutdowns overlap), SIGKILL what is
    left after `grace` seconds, remove the pid files."""
    pids = [pid for pid in (_read_pid(cfg, s) for s in services) if pid is not None]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if _group_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
    for svc in services:
        cfg.pidfile(svc.name).unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our child (a zombie leader keeps its group alive)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def up(cfg: StackConfig) -> None:
    """Start every service not already running, wait until all are healthy; idempotent.
    If one fails, stop what this call started and raise StackError naming its log."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    services = {s.name: s for s in _services(cfg)}
    state = {"s3_port": cfg.s3_port, "mlflow_port": cfg.mlflow_port, "prefect_port": cfg.prefect_port}
    (cfg.data_dir / STATE_FILE).write_text(json.dumps({**state, "bucket": cfg.bucket}) + "\n")
    todo = [s for s in services.values() if _read_pid(cfg, s) is None]
    busy = [f"{s.name} ({HOST}:{s.port})" for s in todo if not _port_free(s.port)]
    if busy:  # checked before starting anything: a foreign server would pass our health checks
        raise StackError(f"ports in use by other processes: {', '.join(busy)}; choose other ports")
    started: list[_Service] = []
    try:
        for svc in services.values():
            if svc.name == "mlflow":  # the landing bucket exists once the stack is up
                _wait_healthy(cfg, services["s3"])
                _ensure_bucket(cfg)
            if svc in todo:
                _start(cfg, svc)
                started.append(svc)
        for svc in services.values():
            _wait_healthy(cfg, svc)
    except BaseException:
        _stop(cfg, started)
        raise


def down(cfg: StackConfig) -> None:
    """Stop every service of this data dir and remove the pid files."""
    _stop(cfg, _services(cfg))


def status(cfg: StackConfig) -> dict[str, dict]:
    """service name → {"pid", "running" (our process is alive), "healthy" (HTTP check), "url"}."""
    out = {}
    for svc in _services(cfg):
        pid = _read_pid(cfg, svc)
        url = cfg.url(svc.port)
        out[svc.name] = {"pid": pid, "running": pid is not None, "healthy": _healthy(url + svc.health), "url": url}
    return out
