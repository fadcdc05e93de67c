"""What workers run for batches: the intake of a batch's file, and moving a finished batch on.

Both are bookkeeping jobs on the `high` queue, carrying a batch id and nothing else; both are
safe to run twice (every change they make is fenced on the batch's status).
"""

from __future__ import annotations

from webapp.extensions import db
from webapp.lifecycle import batches

from .batch_intake import run_intake


def intake(batch_id: str) -> str:
    """Validate a batch's file and create its tasks."""
    try:
        return run_intake(batch_id)
    finally:
        db.session.remove()


def advance(batch_id: str) -> str:
    """Finalize, expire or end the cancelling of a batch whose lines have finished."""
    try:
        return batches.advance(batch_id)
    finally:
        db.session.remove()
