"""What else happens, in the same transaction, when a task is accepted, finishes or is deleted.

Every path of the lifecycle that changes a task this way calls one of these, on the connection
of its own transaction, before that transaction commits: what they write commits with the
change or not at all. Add to them here (never at a call site):

- `_accepted(connection, user, values)`: at submit, just before the row is inserted; `values`
  is what will be inserted (user_id, prompt, model, params, ...) and may be filled in (what the
  task holds of its owner's budget). Raising refuses the submission: the caller rolls back and
  nothing is written.
- `_finished(connection, rows)`: rows (mappings of every `tasks` column, as RETURNING gives
  them) that just reached COMPLETED, FAILED or CANCELLED. Each ending is reported once: the
  status change's fence lets a row end only once.
- `_reopened(connection, rows)`: rows (every column, as they were reopened: PENDING, with their
  fresh attempts) of FAILED or CANCELLED tasks a user or an admin runs again.
- `_removed(connection, rows)`: rows (every column) just deleted by a user or an admin, before
  they finished or after.
- `_batch_ended(connection, rows)`: rows (every `batches` column) of batches that just reached
  completed, failed, cancelled or expired (`lifecycle/batches.py`, fenced, so once each).

`_changed(connection, statement)` runs a status change that RETURNING every column and hands
the rows that ended to `_finished`: the transitions that may end a task go through it.

Work that must wait for the commit (enqueueing jobs) registers itself on the connection's
commit event, as `webapp.outbox.enqueue_at_commit` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import Connection, RowMapping

from .. import budgets, outbox
from ..models import FINISHED, User


def _changed(connection: Connection, statement, params: dict | None = None) -> list[RowMapping]:
    """Run a status change (… RETURNING every column) in the caller's transaction; return its rows.

    The rows that reached a final status go to `_finished`, in the same transaction.
    """
    rows = connection.execute(statement, params or {}).mappings().all()
    _finished(connection, rows)
    return rows


def _accepted(connection: Connection, user: User, values: dict) -> None:
    """A task is being inserted PENDING (in the caller's transaction): hold the most it can cost.

    Sets values["reserved_usd"] and values["reserved_month"]; raises BudgetExceededError (402)
    when that does not fit in its owner's month.
    """
    budgets.hold(connection, user, values)


def _finished(connection: Connection, rows: Iterable[Mapping]) -> None:
    """Tasks just reached a final status: settle what they held (the cost of an answer replaces
    the reservation), and tell their owners' webhook endpoints (outbox rows)."""
    ended = [dict(row) for row in rows if row["status"] in FINISHED]
    if ended:
        budgets.settle(connection, ended)
        outbox.record_task_events(connection, ended)


def _batch_ended(connection: Connection, rows: Iterable[Mapping]) -> None:
    """Batches just reached a final status: tell their owners' webhook endpoints (outbox rows)."""
    outbox.record_batch_events(connection, [dict(row) for row in rows])


def _reopened(connection: Connection, rows: Iterable[Mapping]) -> None:
    """Finished tasks were just made PENDING again: a retry is accepted work, held like a submission.

    Raises BudgetExceededError when one does not fit (the caller rolls back: none is reopened).
    """
    budgets.hold_again(connection, rows)


def _removed(connection: Connection, rows: Iterable[Mapping]) -> None:
    """Tasks were just deleted: release what the unfinished ones held."""
    budgets.release_unfinished(connection, rows)
