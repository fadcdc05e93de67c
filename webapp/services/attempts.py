"""A task's attempt history: which model each provider call went to, and why a task moved on.

The worker writes a row per call that did not answer (webapp/lifecycle/attempts.py, `task_attempts`); the
call that answered is the task's `served_by`. The task page tells the story from these rows:
"local → gpt-4o-mini after 3 × HTTP 500".
"""

from __future__ import annotations

from sqlalchemy import select

from ..extensions import db
from ..models import Task, TaskAttempt


def history(task_id: int) -> list[TaskAttempt]:
    """Return the task's failed calls, oldest first."""
    return list(db.session.scalars(select(TaskAttempt).where(TaskAttempt.task_id == task_id).order_by(TaskAttempt.id)))


def story(task: Task) -> str | None:
    """Say how the task moved along its fallback chain, or None when it never moved on.

    "local → gpt-4o-mini after 3 × HTTP 500"; more hops are joined by "; then ".
    """
    if not task.active_model:
        return None  # still on the model asked for: nothing to tell (and no query)
    hops: list[str] = []
    failures: list[TaskAttempt] = []
    for row in history(task.id):
        failures.append(row)
        if row.fell_back:
            # The calls on this model since the last move on, the one that moved it included.
            mine = [failure for failure in failures if failure.model == row.model]
            hops.append((row.model, _reasons(mine)))
            failures = []
    if not hops:
        return None
    # Each hop goes to the model of the next hop, the last one to where the task runs now.
    targets = [model for model, _ in hops[1:]] + [task.active_model]
    return "; then ".join(f"{model} → {to} after {why}" for (model, why), to in zip(hops, targets, strict=True))


def _reasons(rows: list[TaskAttempt]) -> str:
    """Count the failures by their words, in the order they first happened: "2 × HTTP 500, timeout"."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.detail] = counts.get(row.detail, 0) + 1
    return ", ".join(words if n == 1 else f"{n} × {words}" for words, n in counts.items())
