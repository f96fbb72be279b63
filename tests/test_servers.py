"""The production path on real servers, all on 127.0.0.1 and stopped by the test: the local
stack (moto S3, `mlflow server`, `prefect server start`) and `share serve` (the deployments +
the storage watcher) as its own process. A task landed with `share land` becomes a watcher
event, the event's trigger creates a `continual-update` run of the served deployment, and the
registered version, its aliases and tags are visible through MLflow's and Prefect's REST APIs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from flows.lock import chain_id
from infra import stack
from pipelines import lineage
from pipelines.params import edit_params
from pipelines.workspace import Workspace
from share_core.taskdata import load_task
from share_core.tasks import generate_tasks

from .conftest import free_port, rest, wait_for

MODEL = "share-served"


def test_landing_event_triggers_served_update_on_real_servers(tmp_path, tiny_model_dir):
    cfg = stack.StackConfig(
        data_dir=tmp_path / "stack", s3_port=free_port(), mlflow_port=free_port(), prefect_port=free_port(), timeout=120
    )
    env = {
        **os.environ,
        **stack.env(cfg),
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    ws = tmp_path / "ws"
    lineage.init_workspace(ws)
    edit_params(
        Workspace(ws).params_path,
        base={"model_id": "tiny-minilm", "model_path": str(tiny_model_dir)},
        train={"steps": 10},
    )
    storage = stack.env(cfg)["SHARE_STORAGE"]
    share = [str(Path(sys.executable).parent / "share")]
    log = tmp_path / "serve.log"
    stack.up(cfg)
    serve = None
    try:
        with open(log, "w") as out:
            serve = subprocess.Popen(
                share
                + [
                    "serve",
                    "--storage",
                    storage,
                    "-w",
                    str(ws),
                    "--model-name",
                    MODEL,
                    "--tracking-uri",
                    cfg.url(cfg.mlflow_port),
                    "--poll-seconds",
                    "1",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        api = cfg.url(cfg.prefect_port) + "/api"
        update_name = f"continual-update/chain-{chain_id(Workspace(ws))}"  # deployments are named after the chain
        wait_for(
            "the continual-update deployment",
            lambda: rest(f"{api}/deployments/name/{update_name}"),
            90,
            {"`share serve`": (serve, log)},
            poll=1,
        )
        task_dir = generate_tasks(tmp_path / "tasks", names=["sentiment"], n_train=32, n_eval=16)[0]
        subprocess.run(
            share + ["land", str(task_dir), "--storage", storage], env=env, check=True, capture_output=True, timeout=60
        )

        # the event created a run of the served deployment, which completed
        dep = rest(f"{api}/deployments/name/{update_name}")
        runs = wait_for(
            "a completed continual-update run",
            lambda: [
                r
                for r in rest(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
                if r["state_type"] == "COMPLETED"
            ],
            180,
            {"`share serve`": (serve, log)},
            poll=1,
        )
        assert runs[0]["parameters"]["key"] == "tasks/incoming/datasets/sentiment/task.yaml"
        events = rest(f"{api}/events/filter", {"filter": {"event": {"name": ["share.task.landed"]}}})
        assert [e["payload"]["task"] for e in events["events"]] == ["sentiment"]

        # MLflow's REST API shows the registered version, its aliases and lineage tags
        mlflow = cfg.url(cfg.mlflow_port) + "/api/2.0/mlflow"
        model = rest(f"{mlflow}/registered-models/get?name={MODEL}")["registered_model"]
        assert sorted(a["alias"] for a in model["aliases"]) == ["candidate", "champion"]
        mvs = rest(f"{mlflow}/model-versions/search?filter=name%3D%27{MODEL}%27")["model_versions"]
        tags = {t["key"]: t["value"] for t in mvs[0]["tags"]}
        assert (
            len(mvs) == 1
            and tags["share.version"] == "v0001"
            and tags["share.task"] == "sentiment"
            and tags["lineage.git_rev"]
        )
        assert mvs[0]["source"].startswith("mlflow-artifacts:/") and mvs[0]["source"].endswith(
            "/artifacts/subspace"
        )  # the run's copy of the version
        # the version's manifest is in the stack's artifact store (on disk, served by MLflow)
        assert list((cfg.data_dir / "mlartifacts").glob("**/subspace/manifest.json"))

        # the champion is an MLflow model: pyfunc loads it from the server, `mlflow models serve` answers
        rows = [r["text"] for r in load_task(task_dir).eval[:3]]
        probe = (
            f"import json, mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/{MODEL}@champion'); "
            f"print(json.dumps(m.predict(pd.DataFrame({{'task': ['sentiment'] * 3, 'text': "
            f"{rows!r}}}))['label'].tolist()))"
        )
        py = subprocess.run(
            [sys.executable, "-c", probe],
            env={
                **env,
                "MLFLOW_TRACKING_URI": cfg.url(cfg.mlflow_port),
                "MLFLOW_REGISTRY_URI": cfg.url(cfg.mlflow_port),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert py.returncode == 0, py.stderr[-2000:]
        labels = json.loads(py.stdout.strip().splitlines()[-1])
        assert len(labels) == 3 and set(labels) <= {"negative", "positive"}
        port, serve_log = free_port(), tmp_path / "models-serve.log"
        with open(serve_log, "w") as out:
            model_server = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    f"models:/{MODEL}@champion",
                    "--env-manager",
                    "local",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                ],
                env={
                    **env,
                    "MLFLOW_TRACKING_URI": cfg.url(cfg.mlflow_port),
                    "MLFLOW_REGISTRY_URI": cfg.url(cfg.mlflow_port),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                },  # it execs uvicorn
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            answer = wait_for(
                "mlflow models serve /invocations",
                lambda: rest(
                    f"http://127.0.0.1:{port}/invocations",
                    {"dataframe_split": {"columns": ["task", "text"], "data": [["sentiment", x] for x in rows]}},
                ),
                120,
                {"`mlflow models serve`": (model_server, serve_log)},
                poll=1,
            )
            assert [p["label"] for p in answer["predictions"]] == labels
        finally:
            if model_server.poll() is None:
                os.killpg(model_server.pid, signal.SIGTERM)
                model_server.wait(30)
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(10)
        stack.down(cfg)
