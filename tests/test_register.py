"""pipelines.register's forgetting gate: the champion moves only when no task it serves drops
more than the tolerance."""

import pytest

from pipelines.register import forgetting_gate

from .conftest import evaluation_record


def test_forgetting_gate():
    champ = evaluation_record("v0002", {"a": 0.90, "b": 0.80})
    assert forgetting_gate(evaluation_record("v0003", {"a": 0.895, "b": 0.85, "c": 0.7}), champ, 0.01)["passed"]
    failed = forgetting_gate(evaluation_record("v0003", {"a": 0.87, "b": 0.85}), champ, 0.01)
    assert not failed["passed"] and failed["worst_drop"] == pytest.approx(0.03)
    assert list(failed["drops"]) == ["a"]  # only the tasks that dropped: b improved, c is new
    assert forgetting_gate(evaluation_record("v0001", {"a": 0.1}), None, 0.01)[
        "passed"
    ]  # the first version always serves
