"""The README's commands, run exactly as written (extracted from README.md) the way a user of a
fresh clone runs them: from the repository root (here a directory holding the clone's
params.yaml and its `.venv`), with no virtualenv activated (the venv's bin is not on PATH).
Only the port of the model server is swapped for a free one."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines.params import load_params
from pipelines.validate import validate_landing

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of the README section whose heading starts with `section`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(section)
    end = text.find("\n#", start + len(section))
    return re.findall(r"```bash\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


@pytest.fixture
def clone(tmp_path):
    """A user's checkout after `make`: params.yaml and .venv at its root; PATH without the venv."""
    root = tmp_path / "share"
    root.mkdir()
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (root / ".venv").symlink_to(VENV_BIN.parent)
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != VENV_BIN.resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "SHARE_STORAGE")}
    env.update(PATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    return root, env


def run_bash(script: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{script}\n---- stdout\n{r.stdout[-2000:]}\n---- stderr\n{r.stderr[-3000:]}"
    return r


def test_readme_task_directories_and_an_adapter_landing_as_written(clone):
    root, env = clone
    bucket = root / "bucket"
    bucket.mkdir()
    env["SHARE_STORAGE"] = str(bucket)
    blocks = bash_blocks("### Making task directories")
    assert len(blocks) == 3 and "pipelines.generate" in blocks[0] and "--kind adapter" in blocks[2]
    assert "python -m" not in " ".join(b.replace(".venv/bin/python -m", "") for b in blocks)  # no bare python
    for block in blocks:
        run_bash(block, root, env)
    names = yaml.safe_load((root / "params.yaml").read_text())["tasks"]["names"]
    assert sorted(p.parent.name for p in (root / "landings").glob("*/task.yaml")) == sorted(names)
    assert (bucket / "incoming/datasets/mytask/task.yaml").is_file()
    assert sorted(p.name for p in (bucket / "incoming/adapters/myadapter").iterdir()) == [
        "README.md",  # PEFT's model card
        "adapter_config.json",
        "adapter_model.safetensors",
        "eval.jsonl",
        "task.yaml",
    ]
    # what the pipeline checks on arrival passes too (the workspace's base model, targets and head)
    spec = validate_landing(root / "myadapter", "adapter", "myadapter", None, load_params(root / "params.yaml").base)
    assert spec.labels == ("bad", "good")


ECHO_MODEL = """
import mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input[["task"]].assign(label="good")


mlflow.models.set_model(Echo())
"""


def test_readme_mlflow_models_serve_as_written(clone, tmp_path):
    """`mlflow models serve` as the README writes it starts (uvicorn found) and answers the README's
    request; the registered model is a stand-in: the serving command is what is tested."""
    root, env = clone
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(
        experiment_id=mlflow.create_experiment("readme", artifact_location=(tmp_path / "art").as_uri())
    )
    with mlflow.start_run():
        code = tmp_path / "echo_model.py"  # a model from code: the server process need not import the tests
        code.write_text(ECHO_MODEL)
        mlflow.pyfunc.log_model(
            name="m", python_model=str(code), pip_requirements=[], registered_model_name="share-subspace"
        )
    mlflow.MlflowClient().set_registered_model_alias("share-subspace", "champion", "1")
    section = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "mlflow models serve" in b]
    curls = [b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "/invocations" in b]
    assert len(blocks) == 1 and len(curls) == 1
    port = str(free_port())
    serve = blocks[0].replace("-p 5001", f"-p {port}")
    env = {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", serve], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 120
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        r = run_bash(curls[0].replace("127.0.0.1:5001", f"127.0.0.1:{port}"), root, env, timeout=60)
        assert '"label": "good"' in r.stdout, r.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
