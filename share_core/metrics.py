"""Continual-learning scores and storage accounting (DESIGN §2, Metrics).

R[i][j] is the score on task j after learning task i (j ≤ i). ACC after step i is the mean of
row i; BWT is the mean over j < i of R[i][j] − R[j][j] (negative = forgetting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .state import SubspaceState


@dataclass
class AccuracyMatrix:
    tasks: list[str] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)  # rows[i] has i+1 entries
    majority: list[float | None] = field(default_factory=list)  # each task's trivial baseline (None: none)

    def add_row(self, task: str, majority: float | None, scores: list[float]) -> None:
        """Record the scores on tasks[0..i] right after learning `task` (the i-th)."""
        if len(scores) != len(self.tasks) + 1:
            raise ValueError(f"row for {task!r} needs {len(self.tasks) + 1} scores, got {len(scores)}")
        self.tasks.append(task)
        self.majority.append(majority)
        self.rows.append(list(scores))

    def acc(self, i: int = -1) -> float:
        row = self.rows[i]
        return sum(row) / len(row)

    def bwt(self, i: int = -1) -> float:
        i = i % len(self.rows)
        if i == 0:
            return 0.0
        return sum(self.rows[i][j] - self.rows[j][j] for j in range(i)) / i

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "matrix": self.rows,
            "majority": self.majority,
            "acc": self.acc(),
            "bwt": self.bwt(),
        }

    def table(self) -> list[list[str]]:
        """Rows for printing: header, one row per step, then the majority baseline."""
        head = ["after \\ on"] + self.tasks + ["ACC", "BWT"]
        body = [
            [t]
            + [f"{v:.3f}" for v in row]
            + [""] * (len(self.tasks) - len(row))
            + [f"{self.acc(i):.3f}", f"{self.bwt(i):+.3f}"]
            for i, (t, row) in enumerate(zip(self.tasks, self.rows))
        ]
        if all(m is None for m in self.majority):  # no trivial baseline (e.g. generation tasks)
            return [head] + body
        return [head] + body + [["majority"] + ["" if m is None else f"{m:.3f}" for m in self.majority] + ["", ""]]


def accounting(state: SubspaceState, bytes_per_param: int = 4) -> dict:
    """Stored params of the subspace (basis, coefficients, heads) vs one LoRA per task, and the
    trainable params the next task gets (coefficients + φ temporary directions per side)."""
    basis = sum(b.numel() + a.numel() for b, a in state.bases.values())
    coefs = sum(eb.numel() + ea.numel() for t in state.tasks for eb, ea in t.coefs.values())
    heads = sum(h.numel() for t in state.tasks for h in t.heads.values())
    lora = sum(t.rank * (b.shape[0] + a.shape[0]) for t in state.tasks for b, a in state.bases.values())
    rank = state.tasks[-1].rank if state.tasks else 0
    head_per_task = heads // max(len(state.tasks), 1)
    trainable = head_per_task + sum(
        (b.shape[1] + a.shape[1]) * rank + state.phi * (b.shape[0] + a.shape[0] + 2 * rank)
        for b, a in state.bases.values()
    )
    share_total = basis + coefs + heads
    lora_total = lora + heads
    return {
        "tasks": len(state.tasks),
        "basis_params": basis,
        "coefficient_params": coefs,
        "head_params": heads,
        "share_params": share_total,
        "lora_per_task_params": lora_total,
        "share_bytes": share_total * bytes_per_param,
        "lora_per_task_bytes": lora_total * bytes_per_param,
        "ratio_vs_lora": share_total / lora_total if lora_total else float("nan"),
        "trainable_params_next_task": trainable,
        "k": {ln: [b.shape[1], a.shape[1]] for ln, (b, a) in state.bases.items()},
    }
