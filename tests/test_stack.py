"""The local stack (infra.stack) against real servers: moto S3, MLflow, Prefect on free loopback
ports in a temporary data dir (~40 s on 2 busy cores; Linux: reads /proc), and the production
templates (compose file, work-pool job templates) checked without docker or a cluster."""

import ipaddress
import os
import signal
import socket
import time
from pathlib import Path
from uuid import UUID

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL, temporary_settings

from infra import stack

FAKE_REAL_KEY = "AKIAREALKEYMUSTNOTLEAK"


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (a service's server, workers and helpers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _addr(hexaddr: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hexaddr)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words little-endian
    ip = ipaddress.ip_address(raw)
    return getattr(ip, "ipv4_mapped", None) or ip


def listening(pids: list[int]) -> list[tuple[ipaddress._BaseAddress, int]]:
    """(address, port) of every TCP socket in LISTEN state held by these processes."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                host, port = f[1].split(":")
                out.append((_addr(host), int(port, 16)))
    return out


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # pretend the user has real AWS credentials: they must reach neither the servers nor env()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_REAL_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-secret-must-not-leak")
    s3, mlflow_port, prefect = stack.free_ports(3)
    c = stack.StackConfig(
        data_dir=tmp_path / "stack",
        s3_port=s3,
        mlflow_port=mlflow_port,
        prefect_port=prefect,
        bucket="share-test",
        timeout=75,
    )
    try:
        yield c
    finally:
        stack.down(c)


class _Doubler(mlflow.pyfunc.PythonModel):
    """A registered model small enough for a stack test (the artifacts path is what is tested)."""

    def predict(self, context, model_input: list[int], params=None) -> list[int]:
        return [2 * x for x in model_input]


def restarted_and_still_there(cfg, tmp_path, monkeypatch) -> None:
    """Register a model version and land a dataset, SIGKILL every service, `up` again: the model
    loads with mlflow.pyfunc.load_model and the landing has its objects and ETag."""
    from pipelines.storage import open_storage
    from share_core.tasks import generate_tasks

    e = stack.env(cfg)
    for k, v in e.items():
        monkeypatch.setenv(k, v)
    mlflow.set_tracking_uri(e["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(e["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("stack-durability")
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=_Doubler(), pip_requirements=[], registered_model_name="dur")
    mlflow.MlflowClient().set_registered_model_alias("dur", "champion", "1")
    storage = open_storage(e["SHARE_STORAGE"])
    task_dir = generate_tasks(tmp_path / "tasks", names=["sentiment"], n_train=16, n_eval=8)[0]
    storage.upload_task(task_dir, "dataset", "sentiment")
    landings, objects = [(x.key, x.etag) for x in storage.list_landings()], storage.objects()
    assert len(landings) == 1
    # a chain slot held across the restart (the chain lock is a Prefect limit with a lease)
    with temporary_settings({PREFECT_API_URL: e["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="dur-chain", limit=1))
        lease = c.increment_concurrency_slots_with_lease(["dur-chain"], 1, "concurrency", 300).json()["lease_id"]

    before = stack.status(cfg)
    for s in before.values():
        os.killpg(s["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(s["running"] for s in stack.status(cfg).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.up(cfg)
    after = stack.status(cfg)
    assert all(after[n]["healthy"] and after[n]["pid"] != before[n]["pid"] for n in after), after
    assert [(x.key, x.etag) for x in storage.list_landings()] == landings
    assert storage.objects() == objects
    assert storage.read("tasks/incoming/datasets/sentiment/train.jsonl") == (task_dir / "train.jsonl").read_bytes()
    assert mlflow.pyfunc.load_model("models:/dur@champion").predict([1, 2]) == [2, 4]
    # the lease outlived the server, so its holder's release frees the slot (in memory it was lost
    # and the slot stayed taken: a chain blocked for good)
    with temporary_settings({PREFECT_API_URL: e["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        c.release_concurrency_slots_with_lease(UUID(lease))
        assert c.read_global_concurrency_limit_by_name("dur-chain").active_slots == 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc to check listening sockets")
def test_stack_up_status_artifacts_restart_down(cfg, tmp_path, monkeypatch):
    t0 = time.monotonic()
    stack.up(cfg)
    st = stack.status(cfg)
    assert set(st) == {"s3", "mlflow", "prefect"}
    for name, s in st.items():
        assert s["running"] and s["healthy"], (name, s)
        assert s["url"].startswith("http://127.0.0.1:")
    ports = {"s3": cfg.s3_port, "mlflow": cfg.mlflow_port, "prefect": cfg.prefect_port}

    # every listening socket of every process of each service is on loopback, and its port is there
    pids = {name: group_pids(s["pid"]) for name, s in st.items()}
    for name, group in pids.items():
        socks = listening(group)
        assert (ipaddress.ip_address("127.0.0.1"), ports[name]) in socks, (name, socks)
        assert all(addr.is_loopback for addr, _ in socks), (name, socks)
        for pid in group:  # the servers got moto's dummy credentials, not the user's
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert FAKE_REAL_KEY.encode() not in environ

    # idempotent: a second `up` leaves the healthy services alone
    stack.up(cfg)
    assert {n: s["pid"] for n, s in stack.status(cfg).items()} == {n: s["pid"] for n, s in st.items()}

    # env(): loopback endpoints and moto's dummy credentials only
    e = stack.env(cfg)
    assert e["MLFLOW_TRACKING_URI"] == st["mlflow"]["url"]
    assert e["PREFECT_API_URL"] == st["prefect"]["url"] + "/api"
    assert e["AWS_ENDPOINT_URL"] == e["MLFLOW_S3_ENDPOINT_URL"] == st["s3"]["url"]
    assert e["AWS_ACCESS_KEY_ID"] == stack.DUMMY_AWS["AWS_ACCESS_KEY_ID"] != FAKE_REAL_KEY
    assert e["AWS_SECRET_ACCESS_KEY"] == stack.DUMMY_AWS["AWS_SECRET_ACCESS_KEY"]
    assert all("127.0.0.1" in v for k, v in e.items() if k.endswith(("_URL", "_URI")))

    # MLflow: an experiment and an artifact, which the server stores on disk in the data dir
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=e["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("stack-test")
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "hello stack", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    stored = list((cfg.data_dir / "mlartifacts").glob(f"**/{run.info.run_id}/artifacts/notes/hello.txt"))
    assert [p.read_text() for p in stored] == ["hello stack"]

    # what the stack stores outlives a crash: every service's process group SIGKILLed (nothing
    # flushed on the way out), `up` again, and the registered model loads, the landing is intact
    restarted_and_still_there(cfg, tmp_path, monkeypatch)

    # down: every process gone, pid files removed, ports free again
    st = stack.status(cfg)  # the processes `up` started after the crash
    stack.down(cfg)
    assert all(not group_pids(s["pid"]) for s in st.values())
    assert not list(cfg.data_dir.glob("*.pid"))
    assert not any(s["running"] or s["healthy"] for s in stack.status(cfg).values())
    for port in ports.values():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, LISTEN is not
            sock.bind(("127.0.0.1", port))
    assert time.monotonic() - t0 < 180  # two starts on 2 busy cores


def test_production_templates_parse():
    """The compose file and the work-pool templates stay valid (no docker or cluster needed):
    every published port on loopback, every template placeholder declared as a variable, and the
    GPU template renders one nvidia.com/gpu in requests and limits."""
    import json

    import yaml
    from prefect.utilities.templating import apply_values, find_placeholders

    infra = Path(stack.__file__).parent
    compose = yaml.safe_load((infra / "docker-compose.yml").read_text())
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), name
    assert ".env" in (infra / ".gitignore").read_text().split()
    for f in ("kubernetes-gpu.json", "docker.json"):
        t = json.loads((infra / "work-pools" / f).read_text())
        assert set(t) == {"job_configuration", "variables"}
        props = t["variables"]["properties"]
        assert {p.name for p in find_placeholders(t["job_configuration"])} <= set(props), f
        assert props["image"]["default"]
    k8s = json.loads((infra / "work-pools" / "kubernetes-gpu.json").read_text())
    defaults = {k: v["default"] for k, v in k8s["variables"]["properties"].items() if "default" in v}
    pod = apply_values(k8s["job_configuration"], {**defaults, "image": "share:test"})["job_manifest"]["spec"][
        "template"
    ]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert pod["containers"][0]["image"] == "share:test"
    assert pod["nodeSelector"] and pod["tolerations"]
