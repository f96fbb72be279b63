"""The real CLDR instruction tasks (pipelines/realtasks.py): written in the storage format,
deterministic, held-out prompts disjoint from the training ones, answers that are CLDR's."""

import datetime as dt

from babel import dates, numbers

from pipelines.realtasks import LICENSE, TASKS, examples, generate_real_tasks
from share_core.taskdata import data_hash, load_task


def test_every_task_is_written_in_the_storage_format_and_deterministic(tmp_path):
    a = generate_real_tasks(tmp_path / "a", n_train=24, n_eval=8)
    b = generate_real_tasks(tmp_path / "b", n_train=24, n_eval=8)
    assert [d.name for d in a] == list(TASKS) and len(TASKS) >= 12
    for da, db in zip(a, b):
        task = load_task(da)
        assert task.spec.type == "causal-lm" and task.spec.metric == "exact_match"
        assert len(task.train) == 24 and len(task.eval) == 8
        assert not {r["prompt"] for r in task.train} & {r["prompt"] for r in task.eval}
        assert data_hash(da) == data_hash(db)
    assert "Unicode License" in LICENSE


def test_answers_are_cldr_data():
    row = next(r for r in examples("date_de_short", 0, 50) if "1977-11-20" in r["prompt"])
    assert row["completion"] == dates.format_date(dt.date(1977, 11, 20), "short", locale="de_DE") == "20.11.77"
    for row in examples("number_in", 0, 5):
        x = float(row["prompt"].split()[3])
        assert row["completion"] == numbers.format_decimal(x, locale="en_IN")
    assert all(" et " in r["completion"] or "," not in r["completion"] for r in examples("list_fr", 0, 20))
