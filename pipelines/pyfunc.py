"""A registered version is an MLflow model: the `python_function` flavor serves every task of
the version from its one subspace, rows of different tasks in one mixed batch.

`write_model` puts an `MLmodel` (loader module: this one; a signature) and `share_model.json`
next to the manifest that `register.log_run` logs under the run's `subspace/`, the directory
each model version points at. So `mlflow.pyfunc.load_model("models:/<name>@champion")` and
`mlflow models serve -m models:/<name>@champion --env-manager local` work. The tensors are not
copied into MLflow (DVC stores them once): the loader opens the version in its workspace
(`$SHARE_WORKSPACE` overrides the recorded path), pulling the version's chain from the DVC
remote when it is not there, and refuses a version whose bytes differ from the registered
`state_sha256`. Nothing is unpickled: the flavor is a loader module, not a pickled object.

Input rows: `task` and the family's input column; output: the family's columns
(`share_core.families`: classification reads `text` and returns `label` and `probabilities`,
in the order of the task's labels; causal LM reads `prompt`, renders it through the base's chat
template when it has one, and returns the greedy `completion`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from share_core import state as st
from share_core.base import BaseSpec, load_base
from share_core.families import family
from share_core.model import ShareModel

from . import lineage
from .params import load_params
from .workspace import Workspace

CONFIG = "share_model.json"


def signature(family_name: str):
    """The family's serving schema as an MLflow signature."""
    fam = family(family_name)
    types = {"string": "string", "double[]": Array("double")}
    outputs = [ColSpec(types[kind], name) for name, kind in fam.output_columns]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "task"), ColSpec("string", fam.input_column)]), outputs=Schema(outputs)
    )


def write_model(out: Path, ws: Workspace, version: str) -> Path:
    """MLmodel + share_model.json for `version` in directory `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = st.read_manifest(ws.version_dir(version))
    params = load_params(ws.params_path)
    fam = params.base.family
    # what serving needs, as the version was registered: later edits of params.yaml change nothing here
    serving = {
        "max_length": params.train.max_length,
        "batch_size": params.evaluate.batch_size,
        "max_new_tokens": params.evaluate.max_new_tokens,
    }
    config = {
        "workspace": str(ws.root),
        "version": version,
        "content_hash": manifest.content_hash,
        "state_sha256": manifest.state_sha256,
        "family": fam,
        "tasks": manifest.task_names,
        "base": params.to_dict()["base"],
        "seed": params.train.seed,
        "serving": serving,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    model = Model(signature=signature(fam), metadata={"share_version": version})
    mlflow.pyfunc.add_to_model(model, loader_module=__name__, data=CONFIG)
    model.save(str(out / "MLmodel"))
    return out


class SubspaceModel:
    """What `mlflow.pyfunc.load_model` returns inside its PyFuncModel: predict(DataFrame)."""

    def __init__(self, config: dict, share, tok) -> None:
        self.config, self.share, self.tok = config, share, tok
        self.family = family(config["family"])
        self.column = self.family.input_column
        self.labels = {t.name: list(t.info.get("labels", [])) for t in share.state.tasks}
        self.lock = (
            threading.Lock()
        )  # the scoring server runs requests in threads; a mixed batch sets per-row task ids on the shared layers

    def predict(self, model_input, params=None):
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("task", self.column) if c not in df.columns]
        if missing:
            raise ValueError(f"input rows need the columns ['task', '{self.column}']; missing {missing}")
        tasks, inputs = [str(t) for t in df["task"]], [str(x) for x in df[self.column]]
        unknown = sorted(set(tasks) - set(self.labels))
        if unknown:
            raise ValueError(
                f"unknown task(s) {unknown[:5]} in version {self.config['version']}; it serves "
                f"{sorted(self.labels)[:20]}"
            )
        serving = self.config["serving"]
        with self.lock:
            out = self.family.predict(self.share, self.tok, tasks, inputs, **serving)
        return pd.DataFrame(self.family.serve_rows(tasks, out, self.labels))


def _load_pyfunc(data_path: str) -> SubspaceModel:
    """MLflow's entry point for the flavor: `data_path` is share_model.json."""
    config = json.loads(Path(data_path).read_text())
    ws = Workspace(Path(os.environ.get("SHARE_WORKSPACE") or config["workspace"]))
    if not ws.versions.is_dir():
        raise FileNotFoundError(
            f"no Share workspace at {ws.root} (the registered model opens its version there; set $SHARE_WORKSPACE to "
            "a clone of it)"
        )
    version = config["version"]
    lineage.checkout_version(
        ws.root, version
    )  # the version and the chain it is stored on, pulled from the DVC remote when missing
    manifest = st.read_manifest(ws.version_dir(version))
    if manifest.state_sha256 != config["state_sha256"]:
        raise ValueError(
            f"workspace version {version} has state {manifest.state_sha256[:12]}…, the registered model "
            f"{config['state_sha256'][:12]}…: another chain"
        )
    model, tok = load_base(BaseSpec(**config["base"]), config["seed"])
    return SubspaceModel(config, ShareModel(model, st.load(ws.version_dir(version))).eval(), tok)
