"""Event streams under load: 200 open streams, the delay from a row's update to the client, and
what they cost the pages polled meanwhile.

    .venv/bin/python -m bench.streams [--streams 200] [--pollers 50] [--seconds 30]

The server is the product under gunicorn with `make run`'s settings (gunicorn.conf.py: 2
workers x WEB_THREADS=256 gthreads, STREAMS_PER_PROCESS=200). No worker runs: a writer thread
plays the workers' tracker, appending to every followed task once a second in one statement
(as jobs/tracker.py does) and noting when each write committed; the text it appends carries the
write's number, so each stream client reads in the delta which write it is seeing.

1. Baseline, in this run: 50 paced pollers (bench/pollers.py, a process of its own) on
   GET /tasks/<id>/live with a session cookie (htmx's poll), while the writer writes: p50.
2. Loaded: the same pollers, the same writer, and 200 streams open on 200 other running tasks
   (one asyncio client per stream, on their own connections): the pollers' p50 again, and
   the delay from each write's commit to the moment each stream client has the delta.

The two alternate for `--rounds` rounds (the machine's other load drifts; alternating spreads
it over both), and the medians of the rounds' p50s are compared.

Targets (issue 15): p99 delay <= 1.5 s; loaded poll p50 <= 1.2 x the unloaded p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import threading
import time

import psycopg2

from bench.common import DATABASE_URL, gunicorn, percentiles, reset_database, user_token
from bench.poll_latency import WRITE_TASKS, paced, running_tasks, sign_in
from bench.poll_latency import writer as writes

MARK = re.compile(r"<w(\d+)>")


class Writer:
    """Appends `<wN>` to every given task once a second in one statement; remembers each commit's time."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.committed: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        db = psycopg2.connect(DATABASE_URL)  # not `with`: that would be one transaction to the end
        db.autocommit = True
        try:
            with db.cursor() as cur:
                n = 0
                while not self.stop.wait(1.0):
                    n += 1
                    cur.execute(
                        "UPDATE tasks SET result = result || %s, progress = LEAST(progress + 1, 99), updated_at = now()"
                        " WHERE id = ANY(%s)",
                        (f" <w{n}>", self.ids),
                    )
                    self.committed[n] = time.time()
        finally:
            db.close()


async def stream_client(port: int, token: str, task_id: int, delays: list[float], writer: Writer, stop) -> None:
    """Follow one task's stream; for every write seen in a delta, record commit-to-arrival."""
    reader, out = await asyncio.open_connection("127.0.0.1", port)
    out.write(
        (
            f"GET /api/v1/tasks/{task_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    if " 200 " not in status_line:
        raise RuntimeError(f"stream {task_id}: {status_line}")
    first = True  # the stream's first delta is the text so far: every write before it opened
    try:
        while not stop.is_set():
            line = await asyncio.wait_for(reader.readline(), timeout=20)
            if not line:
                break
            if line.startswith(b"data: ") and b'"delta"' in line:
                arrived = time.time()
                if first:
                    first = False
                    continue
                for mark in MARK.findall(json.loads(line[6:])["delta"]):
                    committed = writer.committed.get(int(mark))
                    if committed is not None:
                        delays.append(arrived - committed)
    except TimeoutError:
        pass
    finally:
        out.close()


async def open_streams(port: int, token: str, ids: list[int], writer: Writer, seconds: float) -> list[float]:
    delays: list[float] = []
    stop = asyncio.Event()
    clients = [asyncio.create_task(stream_client(port, token, i, delays, writer, stop)) for i in ids]
    await asyncio.sleep(seconds)
    stop.set()
    for client in clients:
        client.cancel()
    failures = [r for r in await asyncio.gather(*clients, return_exceptions=True) if isinstance(r, Exception)]
    if failures:
        print(f"{len(failures)} streams failed, e.g. {failures[0]!r}", file=sys.stderr)
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=15, help="length of each paced pass")
    parser.add_argument("--rounds", type=int, default=3, help="passes without and with streams, alternated")
    args = parser.parse_args()

    reset_database()
    token = user_token("poller")
    live = "/tasks/%d/live?seen=PROCESSING"
    unloaded, loaded, delays = [], [], []
    with gunicorn("wsgi:app", project_config=True) as port:
        polled = running_tasks(token, port, args.pollers)
        followed = running_tasks(token, port, args.streams)
        cookie = sign_in(port, "poller")
        with psycopg2.connect(DATABASE_URL) as db, db.cursor() as cur:
            cur.execute("UPDATE tasks SET result = %s WHERE id = ANY(%s)", ("", followed))
        writer = Writer(followed)
        writer.thread.start()
        paced(port, live, polled, args.pollers, 3, "Processing", cookie)  # warm-up
        # The writer appends to the followed tasks all along (with or without streams, the same
        # database load); the polled tasks get the poll bench's writes.
        with writes(WRITE_TASKS.replace("WHERE status = 'PROCESSING'", f"WHERE id = ANY(ARRAY{polled})")):
            for _ in range(args.rounds):
                unloaded.append(paced(port, live, polled, args.pollers, args.seconds, "Processing", cookie))
                seen: list[float] = []
                streaming = threading.Thread(
                    target=lambda seen=seen: seen.extend(
                        asyncio.run(open_streams(port, token, followed, writer, args.seconds + 6))
                    ),
                    daemon=True,
                )
                streaming.start()
                time.sleep(4)  # every stream open and following before the pollers start
                loaded.append(paced(port, live, polled, args.pollers, args.seconds, "Processing", cookie))
                streaming.join(60)
                delays += [d * 1000 for d in seen]
        writer.stop.set()

    if len(delays) < args.rounds * args.streams * args.seconds // 2:
        raise SystemExit(f"too few deltas arrived ({len(delays)}): are the streams open?")
    d = percentiles(delays)
    print(
        f"event streams: {args.rounds} rounds of {args.pollers} paced pollers on GET /tasks/<id>/live for"
        f" {args.seconds} s without streams, then with {args.streams} streams open, each followed task written"
        " every second; gunicorn.conf.py (2 workers x 256 gthreads)"
    )
    print(
        f"row update -> stream client, {len(delays):,} deltas: p50 {d['p50']:.0f} ms, p90 {d['p90']:.0f} ms,"
        f" p99 {d['p99']:.0f} ms, max {max(delays):.0f} ms  (target p99 <= 1500 ms)"
    )
    print(f"{'page polls, p50 ms per round':44} " + " ".join(f"{'round ' + str(n + 1):>9}" for n in range(args.rounds)))
    for label, passes in (("no streams (baseline, this run)", unloaded), (f"{args.streams} streams open", loaded)):
        print(f"{label:44} " + " ".join(f"{r['p50_ms']:9.2f}" for r in passes))
    base = statistics.median(r["p50_ms"] for r in unloaded)
    busy = statistics.median(r["p50_ms"] for r in loaded)
    print(
        f"median poll p50: {base:.2f} ms without streams, {busy:.2f} ms with; ratio {busy / base:.2f} (target <= 1.20)"
    )


if __name__ == "__main__":
    main()
