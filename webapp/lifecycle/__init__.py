"""A task's life, and a batch's: every status change as one named, fenced function.

The web app (services, views) and the workers (jobs/) both call these; no other module writes a
task's or a batch's `status` (tests/test_layers.py holds every module to that). Where each
change lives:

- `commands.py`, what people do: submit (-> PENDING), cancel (PENDING|PROCESSING -> CANCELLED),
  reopen, i.e. retry (FAILED|CANCELLED -> PENDING), delete; one task or many by filter.
- `attempts.py`, what workers and the sweeper do: claim (PENDING -> PROCESSING), reclaim (the
  next attempt in place), complete (-> COMPLETED), fail (-> FAILED), hand_back (-> PENDING,
  fenced by the attempt), release (-> PENDING or FAILED, fenced by the job id), take_back
  (lease expired -> PENDING or FAILED), defer and wake (PENDING, later or now), requeue.
- `queueing.py`: the job time limit (`job_timeout`) and the one "enqueue, or leave it to the
  sweeper" (`enqueue`), and dropping a cancelled task's job.
- `hooks.py`: what else is written in the same transaction as a change. `_accepted(connection,
  user, values)` at submit; `_finished(connection, rows)` for rows that just reached COMPLETED,
  FAILED or CANCELLED, by any path (it writes the webhook outbox rows, `webapp/outbox.py`,
  whose jobs are enqueued after the commit); `_reopened` and `_removed` likewise. Add to the
  hooks, never at a call site: every path that accepts or finishes a task already calls them.

Changes that other systems hear about (webhooks) and money held for a task (budgets) are
written in the same transaction as the status change they follow.
"""

from .commands import (
    CANCELLED_BY,
    REOPENABLE,
    AtCapacityError,
    cancel,
    cancel_rows,
    delete_tasks,
    drop_jobs,
    reopen,
    submit,
)
from .queueing import drop_job, enqueue, job_timeout

__all__ = [
    "AtCapacityError",
    "CANCELLED_BY",
    "REOPENABLE",
    "cancel",
    "cancel_rows",
    "delete_tasks",
    "drop_job",
    "drop_jobs",
    "enqueue",
    "job_timeout",
    "reopen",
    "submit",
]
