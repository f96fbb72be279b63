"""params.yaml is one schema (pipelines.params): defaults from the dataclasses, every value
typed, unknown sections and keys refused with the file and the key named; and the reports DVC
shows for a workspace (pipelines.evaluate.publish_head) are written once per HEAD move."""

import json

import pytest
import yaml

from pipelines import evaluate as ev
from pipelines import register
from pipelines.params import EvalParams, Params, edit_params, load_params, save_params
from pipelines.workspace import Workspace

from .conftest import write_record


def write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_round_trip_and_a_missing_file_is_the_defaults(tmp_path):
    assert load_params(tmp_path / "absent.yaml") == Params()
    save_params(tmp_path / "params.yaml", Params())
    assert load_params(tmp_path / "params.yaml") == Params()
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["base"]["family"] == "sequence-classification"


def test_values_are_typed(tmp_path):
    p = load_params(
        write(tmp_path, "train: {lr: 1e-4, steps: 10}\nsubspace: {energy: 0.9}\nevaluate: {certify_tolerance: 1e-6}\n")
    )
    assert p.train.lr == 1e-4 and isinstance(p.train.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert p.subspace.policy.energy == 0.9 and p.evaluate.certify_tolerance == 1e-6 and p.train.steps == 10


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {steps: '10'}\n", "train.steps is '10'; expected int"),
        ("train: {steps: true}\n", "train.steps is True; expected int"),
        ("train: {lr: fast}\n", "train.lr is 'fast'; expected float"),
        ("train: {rank: 0}\n", "rank must be ≥ 1"),
        ("subspace: {energy: 1.5}\n", "energy must be in (0, 1]"),
        ("base: {target_modules: query}\n", "base.target_modules is 'query'; expected a list of names"),
        ("base: {family: vision}\n", "base.family must be one of"),
        ("trian: {steps: 3}\n", "unknown section(s) ['trian']"),
        ("train: {stepz: 3}\n", "unknown keys in section 'train': ['stepz']"),
        ("train: [1, 2]\n", "section 'train' must be a mapping"),
    ],
)
def test_bad_values_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(ValueError) as e:
        load_params(write(tmp_path, text))
    assert str(e.value).startswith("params.yaml: ") and message in str(e.value)


def test_empty_sections_take_the_defaults_and_other_sections_are_kept(tmp_path):
    path = write(tmp_path, "tasks: {names: [a]}\ntrain:\nbase: {model_path: models/tiny}\n")
    p = load_params(path)
    assert p.train == Params().train and p.base.model_path == str(
        tmp_path / "models" / "tiny"
    )  # relative to the params file
    edit_params(path, train={"steps": 7})
    assert yaml.safe_load(path.read_text())["tasks"] == {"names": ["a"]} and load_params(path).train.steps == 7


def test_head_reports_are_written_once_per_head_move_and_survive_a_torn_line(tmp_path):
    ws = Workspace(tmp_path)
    for i, v in enumerate(("v0001", "v0002")):
        write_record(ws, v, {}, tasks=["a"] * (i + 1), rescored=["a"], acc=0.5 + i / 10, bwt=(0.0, -0.01)[i])
    ev.publish_head(ws, "v0001")
    ev.publish_head(ws, "v0001")  # a resumed step: no second row
    with open(ws.history_path, "a") as f:
        f.write("3,v00")  # a crash in the middle of an older, appending writer
    ev.publish_head(ws, "v0002")
    rows = ws.history_path.read_text().splitlines()
    assert rows == [
        "step,version,acc,bwt,tasks,rescored,certified",
        "1,v0001,0.500000,0.000000,1,1,0",
        "2,v0002,0.600000,-0.010000,2,1,0",
    ]
    assert json.loads(ws.head_metrics_path.read_text()) == {
        "version": "v0002",
        "acc": 0.6,
        "bwt": -0.01,
        "tasks": 2,
        "rescored": 1,
        "certified": 0,
    }


def test_the_forgetting_gate_takes_its_tolerance_from_params_yaml(tmp_path, monkeypatch):
    """One source of truth: a flow passes no tolerance, so the gate reads evaluate.gate_tolerance;
    an explicit tolerance still wins. A drop of 0.1 passes at 0.2 and fails at the default 0.01."""
    ws = Workspace(tmp_path)
    for version, score in (("v0001", 0.9), ("v0002", 0.8)):
        write_record(ws, version, {"t": score})
    monkeypatch.setattr(register.Registry, "client", lambda self: None)
    monkeypatch.setattr(register, "_alias_version", lambda client, name, alias: "v0001")
    reg = register.Registry(ws, "m")
    assert not register.gate_for(reg, "v0002")["passed"]  # no params.yaml: the default 0.01
    save_params(ws.params_path, Params(evaluate=EvalParams(gate_tolerance=0.2)))
    gate = register.gate_for(reg, "v0002")
    assert gate["passed"] and gate["worst_drop"] == pytest.approx(0.1)
    assert not register.gate_for(reg, "v0002", tolerance=0.05)["passed"]
    with pytest.raises(ValueError, match="gate_tolerance"):
        load_params(write(tmp_path, "evaluate: {gate_tolerance: 2}\n"))
