"""What one sweeper pass costs with a backlog of queued tasks, against the bare reads it needs.

Every PENDING task older than SWEEP_GRACE_SECONDS is a candidate, and the pass reads RQ's queues
and scheduled registries whole to tell which are held. The baseline is those two reads alone
(the candidates' rows, LRANGE/ZRANGE of every queue): the floor of any sweeper that checks.

    BENCH_DATABASE_URL=... BENCH_REDIS_URL=... .venv/bin/python -m bench.sweeper_pass
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta

from bench.common import DATABASE_URL, REDIS_URL, reset_database
from webapp import create_app

BACKLOGS = (1_000, 10_000)
ROUNDS = 7


def main() -> None:
    print("sweeper pass with every task queued and older than the grace period (nothing to do but check)")
    print(f"{'backlog':>8} {'baseline ms':>12} {'sweep ms':>9} {'ratio':>6}")
    for backlog in BACKLOGS:
        base, swept = measure(backlog)
        print(f"{backlog:>8,} {base:>12.1f} {swept:>9.1f} {swept / base:>6.2f}")


def measure(backlog: int) -> tuple[float, float]:
    reset_database()
    app = create_app(
        {"DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL, "SECRET_KEY": "bench", "RATELIMIT_ENABLED": False}
    )
    with app.app_context():
        from sqlalchemy import select, update

        from jobs.sweeper import held_job_ids, sweep
        from webapp.extensions import db
        from webapp.models import Task, TaskStatus, utcnow
        from webapp.queues import redis
        from webapp.services import accounts, tasks

        user = accounts.create_user("sweep-bench", "bench-password")
        submission = tasks.validate_submission("queued for the benchmark")
        for _ in range(backlog):
            tasks.submit(user, submission)
        db.session.execute(update(Task).values(updated_at=utcnow() - timedelta(hours=1)))
        db.session.commit()

        def baseline() -> None:
            db.session.execute(
                select(Task.id, Task.priority, Task.model, Task.job_id, Task.run_after, Task.created_at).where(
                    Task.status == TaskStatus.PENDING.value
                )
            ).all()
            db.session.commit()
            held_job_ids(redis())

        def one_pass() -> None:
            report = sweep()
            assert not report.requeued and not report.skipped, report

        return timed(baseline), timed(one_pass)


def timed(action) -> float:
    action()  # warm up
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
