"""The repository's own dvc.yaml + params.yaml: `dvc repro` runs generate → three versions →
evaluate through the step CLIs and leaves metrics that `dvc metrics show` reads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.evaluate import accuracy_matrix, read_record
from pipelines.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_repro_builds_the_chain_from_params(tmp_path, tiny_model_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"].update(n_train=32, n_eval=16)
    params["train"]["steps"] = 3
    params["base"] = {"model_id": "tiny-minilm", "model_path": str(tiny_model_dir)}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / ".venv").symlink_to(Path(sys.executable).parent.parent)  # what `make venv` makes in a clone
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d != venv_bin),
        "DVC_NO_ANALYTICS": "1",
    }  # not activated

    def run(*cmd):
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
        return out.stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    # a fresh clone: every stage is due (`dvc repro --dry` cannot say it: DVC hashes the deps of a
    # dry run, which upstream stages have not made yet; treeverse/dvc#9021)
    pending = run(sys.executable, "-m", "dvc", "status")
    assert all(f"{stage}:" in pending for stage in ("generate", "v0001", "v0002", "v0003", "evaluate"))
    run(sys.executable, "-m", "dvc", "repro")
    record = read_record(Workspace(repo), "v0003")
    assert record.tasks == ["sentiment", "topic", "tense"] and set(record.first_scores) == set(record.tasks)
    matrix = accuracy_matrix(Workspace(repo), "v0003")  # the rows of v0001..v0003, assembled from their records
    assert [sum(x is not None for x in r) for r in matrix["rows"]] == [1, 2, 3]
    manifest = json.loads((repo / "versions" / "v0003" / "manifest.json").read_text())
    assert manifest["parent"] == "v0002" and manifest["base_model"]["id"] == "tiny-minilm"
    assert "acc" in run(sys.executable, "-m", "dvc", "metrics", "show", "--json")
    assert "up to date" in run(sys.executable, "-m", "dvc", "status").lower()  # dvc.lock pins every dep and out
