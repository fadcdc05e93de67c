"""The fault suite's machine room: real processes on 127.0.0.1 that the tests can kill.

- PostgreSQL: a private cluster (initdb in a temp folder, its own port), so the suite can stop
  and start it without touching the machine's shared cluster, which other people's tests use.
  initdb refuses to run as root, so as root it runs as the `postgres` user.
- Redis: a redis-server of its own on a free port, to FLUSHALL, kill and start empty.
- the fake provider in a process of its own (`python -m tests.fake_provider 0`), counting calls.
- the app under gunicorn, `flask worker` processes (each in a session of its own, so a "whole
  worker", with the RQ scheduler it may have forked, can be killed as a process group) and the
  `flask scheduler` (the sweeper).

Measurements do not use the code under test: an audit trigger records every status change of
every task (duplicate final writes), and a monitor thread samples, with plain SQL and raw Redis
reads, which unfinished tasks nobody holds (time stuck).
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from redis import Redis

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")

# Short clocks, so a case ends in seconds: leases of 3 s renewed every second, a sweep every
# second, a 3 s grace on shutdown. The code is the same as with the production defaults.
FAULT_SETTINGS = {
    "LEASE_SECONDS": "3",
    "SWEEP_INTERVAL": "1",
    "SWEEP_GRACE_SECONDS": "3",
    "PROGRESS_INTERVAL": "0.2",
    "RETRY_BASE_SECONDS": "0.5",
    "RETRY_MAX_SECONDS": "4",
    "SHUTDOWN_GRACE_SECONDS": "3",
    "BREAKER_FAILURES": "5",
    "BREAKER_OPEN_SECONDS": "2",
    "BREAKER_MAX_OPEN_SECONDS": "8",
    "DB_RETRY_SECONDS": "60",
    "TASK_MAX_ATTEMPTS": "3",
    # Four tasks at once per worker process: a kill -9 takes down at most four attempts, and
    # several workers share every batch.
    "WORKER_CONCURRENCY": "4",
}

# The fake model's calls in flight at once (the catalog's default: models.toml sets none).
MODEL_CONCURRENCY = 16

# The longest a task may sit unfinished with nobody holding it, with FAULT_SETTINGS' clocks.
STUCK_BOUND = 30.0

AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS fault_audit (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    old_status text,
    new_status text NOT NULL,
    attempts int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION fault_audit_write() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO fault_audit (task_id, old_status, new_status, attempts)
        VALUES (NEW.id, NULL, NEW.status, NEW.attempts);
    ELSIF NEW.status IS DISTINCT FROM OLD.status OR OLD.status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN
        -- every status change, and any write at all to a finished task
        INSERT INTO fault_audit (task_id, old_status, new_status, attempts)
        VALUES (NEW.id, OLD.status, NEW.status, NEW.attempts);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS fault_audit ON tasks;
CREATE TRIGGER fault_audit AFTER INSERT OR UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION fault_audit_write();
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class PostgresCluster:
    """A private PostgreSQL cluster the suite may stop and start."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="atr-faults-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.dir.chmod(0o755)
        self.url = f"postgresql://root@127.0.0.1:{self.port}/faults"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, cwd=self.dir)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "root", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
            )
        self.start()
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="root", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE faults")
        conn.close()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "start")

    def stop(self) -> None:
        """Stop as an operator restarting it would: sessions are cut, new ones refused."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self):
        return psycopg2.connect(host="127.0.0.1", port=self.port, user="root", dbname="faults", connect_timeout=3)


class RedisServer:
    """A redis-server of the suite's own, that it may flush, kill and start empty."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.logs = logs
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=open(self.logs / "redis.log", "a"),  # noqa: SIM115 (the server keeps it open)
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.client().ping(), 10, "redis-server")

    def kill(self) -> None:
        """SIGKILL: Redis dies with everything it held."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)


class Response:
    def __init__(self, status_code: int, headers: dict[str, str], body: bytes):
        self.status_code = status_code
        self.headers = headers
        self.text = body.decode(errors="replace")

    def json(self):
        return json.loads(self.text)


class Http:
    """A keep-alive JSON client for one thread (the standard library's, so no dependency)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 30):
        rest = base_url.removeprefix("http://")
        self.netloc, _, path = rest.partition("/")
        self.prefix = "/" + path if path else ""
        self.headers = headers or {}
        self.timeout = timeout
        self.connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, json_body=None, headers: dict[str, str] | None = None) -> Response:
        body = None if json_body is None else json.dumps(json_body).encode()
        all_headers = {**self.headers, **(headers or {})}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.netloc, timeout=self.timeout)
        try:
            self.connection.request(method, self.prefix + path, body=body, headers=all_headers)
            reply = self.connection.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if reply.getheader("Connection", "").lower() == "close":
            self.close()
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, data)

    def get(self, path: str, **kwargs) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json=None, headers=None) -> Response:
        return self.request("POST", path, json_body=json, headers=headers)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Outcome:
    """One client's view of its submissions."""

    accepted: dict[str, int] = field(default_factory=dict)  # prompt -> task id (from a 202)
    unavailable: int = 0  # 503s answered with the error envelope (then retried)
    bad: list[str] = field(default_factory=list)  # anything else: a 500, a 503 without envelope, ...


class Cluster:
    """Everything a fault case needs, started once per session; workers per case."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.pg = PostgresCluster()
        self.redis = RedisServer(logs)
        self.workers: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []
        self.scheduler: subprocess.Popen | None = None
        self.monitor: Monitor | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.pg.init()
        self.redis.start()
        self.provider = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_provider", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(self.logs / "provider.log", "a"),  # noqa: SIM115 (the server keeps it open)
            text=True,
        )
        self.provider_url = self.provider.stdout.readline().split(" at ")[-1].strip()
        models = self.logs / "models.toml"
        models.write_text(
            f"""
[models.fake]
base_url = "{self.provider_url}"
upstream = "fake-1"
max_tokens = 1024
default_max_tokens = 64
timeout = 10
read_timeout = 2
"""
        )
        self.env = {
            **os.environ,
            "SECRET_KEY": "fault-suite",
            "DATABASE_URL": self.pg.url,
            "REDIS_URL": self.redis.url,
            "MODELS_FILE": str(models),
            "DEFAULT_MODEL": "fake",
            "RATELIMIT_ENABLED": "false",
            "LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            "INSTANCE_PATH": str(self.logs / "instance"),
            **FAULT_SETTINGS,
        }
        self.flask("db", "upgrade")
        conn = self.pg.connect()
        with conn, conn.cursor() as cur:
            cur.execute(AUDIT_SQL)
        conn.close()
        self.flask("users", "create", "faults", "--password-stdin", stdin="fault suite password\n")
        self.token = self.flask("tokens", "create", "faults").strip().splitlines()[-1]
        port = free_port()
        self.app_url = f"http://127.0.0.1:{port}"
        self.app = self._spawn(
            "web",
            [str(VENV_BIN / "gunicorn"), "-w", "2", "--threads", "8", "-b", f"127.0.0.1:{port}", "wsgi:app"],
        )
        wait_until(lambda: Http(self.app_url, timeout=2).get("/api/v1/health").status_code, 30, "the app")

    def stop(self) -> None:
        self.stop_workers()
        for process in [self.app, self.provider]:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.redis.kill()
        self.pg.destroy()

    def reset(self) -> None:
        """Start a case from nothing: no tasks, no audit, empty Redis, provider counts cleared."""
        conn = self.pg.connect()
        with conn, conn.cursor() as cur:
            cur.execute("TRUNCATE idempotency_keys, tasks, fault_audit RESTART IDENTITY CASCADE")
        conn.close()
        if self.redis.process is None:
            self.redis.start()
        self.redis.client().flushall()
        with Http(self.provider_url.removesuffix("/v1")) as http:
            http.post("/_reset", json={})

    def flask(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "wsgi", *args],
            cwd=ROOT,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 (the process keeps it open)
        # A session of its own: killing "the whole worker" is killing its process group.
        return subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_workers(self, count: int) -> None:
        for _ in range(count):
            self.start_worker()
        if self.scheduler is None or self.scheduler.poll() is not None:
            self.scheduler = self._spawn("scheduler", [sys.executable, "-m", "flask", "--app", "wsgi", "scheduler"])

    def start_worker(self) -> subprocess.Popen:
        name = f"w-{uuid.uuid4().hex[:6]}"
        worker = self._spawn(name, [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--name", name])
        worker.name = name  # type: ignore[attr-defined]
        self.workers.append(worker)
        return worker

    def running(self, worker: subprocess.Popen) -> int:
        """Return how many jobs a worker is running now (its executions in RQ's registry)."""
        return self.redis.client().scard(f"rq:worker:{worker.name}:executions")

    def live_workers(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    def stop_workers(self) -> None:
        for process in [*self.workers, *([self.scheduler] if self.scheduler else [])]:
            if process.poll() is None:
                with_children = [process.pid, *children(process.pid)]
                for pid in with_children:
                    with _gone():
                        os.kill(pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()
        self.scheduler = None

    # --- clients -------------------------------------------------------------------------

    def client(self) -> Http:
        return Http(f"{self.app_url}/api/v1", headers={"Authorization": f"Bearer {self.token}"})

    def submit(self, prompts: list[str], clients: int = 1, key_prefix: str | None = None) -> Outcome:
        """Submit every prompt once, from `clients` threads; retry 503s with the same Idempotency-Key."""
        outcome = Outcome()
        lock = threading.Lock()
        key_prefix = key_prefix or uuid.uuid4().hex

        def run(share: list[str]) -> None:
            with self.client() as http:
                for prompt in share:
                    key = f"{key_prefix}-{abs(hash(prompt))}"
                    for _ in range(600):
                        try:
                            response = http.post("/tasks", json={"prompt": prompt}, headers={"Idempotency-Key": key})
                        except (OSError, http.client.HTTPException) as exc:
                            with lock:
                                outcome.bad.append(f"transport error {exc!r}")
                            time.sleep(0.2)
                            continue
                        if response.status_code == 202:
                            with lock:
                                outcome.accepted[prompt] = response.json()["id"]
                            break
                        body = (
                            response.json()
                            if response.headers.get("content-type", "").startswith("application/json")
                            else None
                        )
                        if response.status_code == 503 and body and body.get("error", {}).get("code") == "unavailable":
                            with lock:
                                outcome.unavailable += 1
                            time.sleep(0.2)
                            continue
                        with lock:
                            outcome.bad.append(f"{response.status_code} {response.text[:200]}")
                        break

        shares = [prompts[i::clients] for i in range(clients)]
        threads = [threading.Thread(target=run, args=(share,)) for share in shares]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcome

    # --- what happened -------------------------------------------------------------------

    def query(self, sql: str, *args) -> list[tuple]:
        conn = self.pg.connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    def unfinished(self, ids: list[int]) -> int:
        if not ids:
            return 0
        return self.query("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status NOT IN %s", ids, FINISHED)[0][0]

    def wait_finished(self, ids: list[int], timeout: float) -> None:
        wait_until(lambda: self.unfinished(ids) == 0, timeout, "every accepted task to finish", interval=0.5)

    def provider_calls(self) -> dict[str, int]:
        with Http(self.provider_url.removesuffix("/v1")) as http:
            return http.get("/_calls").json()

    def start_monitor(self, interval: float = 0.25) -> Monitor:
        self.monitor = Monitor(self, interval)
        self.monitor.start()
        return self.monitor


def children(pid: int) -> list[int]:
    """Return the child pids of a process (Linux /proc)."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with _gone(), open(path) as handle:
            found.extend(int(p) for p in handle.read().split())
    return found


class _gone:
    """Ignore a process that ended meanwhile."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, ProcessLookupError | FileNotFoundError | PermissionError)


class Monitor(threading.Thread):
    """Samples (four times a second by default) which unfinished tasks nobody holds, and for how long.

    Stuck: PROCESSING with its lease not renewed for more than a renewal interval plus a
    second (its worker is gone), or PENDING, due, and its job on no queue and not waiting its
    time in a scheduled registry (Redis lost it, or it is overdue there: no scheduler is moving
    it), and not in its model's line while the model's slots are all taken. Read with plain SQL
    and raw Redis, not with the sweeper's code. A task counts once two samples in a row find it
    stuck (a job between its pop and its claim is on no list for a few milliseconds), measured
    from the first.
    """

    def __init__(self, cluster: Cluster, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="fault-monitor")
        self.cluster = cluster
        self.interval = interval
        self.stop_event = threading.Event()
        self.since: dict[int, float] = {}
        self.seen_once: dict[int, float] = {}
        self.longest = 0.0
        self.longest_task: int | None = None
        self.longest_why = ""  # what the first sighting of the longest saw
        self.why: dict[int, str] = {}  # at the first sighting
        self.last_why: dict[int, str] = {}  # at the last
        lease = float(FAULT_SETTINGS["LEASE_SECONDS"])
        self.overdue = lease - lease / 3 - 1.0  # lease left when a renewal is a second late

    def run(self) -> None:
        conn = None
        while not self.stop_event.wait(self.interval):
            try:
                if conn is None or conn.closed:
                    conn = self.cluster.pg.connect()
                    conn.autocommit = True
                stuck = self._sample(conn)
            except Exception:
                conn = None  # the database or Redis is down: no sample, no verdict
                continue
            now = time.monotonic()
            for task_id in list(self.since):
                if task_id not in stuck:
                    self._close(task_id, now)
            for task_id in list(self.seen_once):
                if task_id not in stuck:
                    del self.seen_once[task_id]  # a blip (a job between its pop and its claim)
            for task_id in stuck:
                if task_id in self.since:
                    self.last_why[task_id] = stuck[task_id]
                    continue
                if task_id in self.seen_once:
                    self.since[task_id] = self.seen_once.pop(task_id)  # counted from the first sighting
                else:
                    self.seen_once[task_id] = now
                    self.why[task_id] = stuck[task_id]

    def _close(self, task_id: int, now: float) -> None:
        length = now - self.since.pop(task_id)
        if length > self.longest:
            first, last = self.why.get(task_id, ""), self.last_why.get(task_id, "")
            self.longest, self.longest_task = length, task_id
            self.longest_why = first if last in ("", first) else f"{first}; then {last}"

    def _sample(self, conn) -> dict[int, str]:
        """Return the tasks nobody holds now, each with what was seen of it."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT id, status, job_id, lease_expires_at - now() < make_interval(secs => %s), "
                "coalesce(run_after <= now(), true) FROM tasks WHERE status IN ('PENDING', 'PROCESSING')",
                (self.overdue,),
            )
            rows = cur.fetchall()
        redis = self.cluster.redis.client()
        held: set[str] = set()
        # A delayed job more than two of RQ's scheduler ticks past its time has nobody moving it.
        scheduled_after = time.time() - 2
        for name in ("high", "default", "low"):
            held.update(j.decode() for j in redis.lrange(f"rq:queue:{name}", 0, -1))
            held.update(j.decode() for j in redis.zrangebyscore(f"rq:scheduled:{name}", scheduled_after, "+inf"))
        # Waiting in the model's line is held, while the model's slots are all taken.
        line = {int(task) for task in redis.zrange("atr:limit:fake:line", 0, -1)}
        live = redis.zcount("atr:limit:fake:slots", time.time(), "+inf")
        lapsed = redis.zcard("atr:limit:fake:slots") - live  # expired, not yet handed on
        in_line = line if live >= MODEL_CONCURRENCY else set()
        stuck: dict[int, str] = {}
        for task_id, status, job_id, overdue, due in rows:
            if status == "PROCESSING" and overdue:
                stuck[task_id] = "PROCESSING, its lease not renewed"
            elif status == "PENDING" and due and (job_id is None or job_id not in held) and task_id not in in_line:
                where = "on no queue"
                if task_id in line:
                    where = f"in line, {live} of {MODEL_CONCURRENCY} slots live, {lapsed} expired"
                stuck[task_id] = f"PENDING, job {job_id} {where}"
        return stuck

    def finish(self) -> float:
        self.stop_event.set()
        self.join(5)
        now = time.monotonic()
        for task_id in list(self.since):
            self._close(task_id, now)
        return self.longest


@dataclass
class CaseReport:
    case: str
    submitted: int
    completed: int
    failed: int
    lost: int
    duplicate_final_writes: int
    provider_calls: int
    attempts: int
    over_called: int
    longest_stuck: float
    seconds: float
    notes: str = ""
    longest_stuck_task: int | None = None  # in reports.jsonl, with what was seen of it
    longest_stuck_why: str = ""

    def row(self) -> str:
        return (
            f"| {self.case} | {self.submitted} | {self.completed} | {self.failed} | {self.lost} | "
            f"{self.duplicate_final_writes} | {self.provider_calls} | {self.attempts} | {self.longest_stuck:.1f} s | "
            f"{self.seconds:.0f} s | {self.notes} |"
        )


HEADER = (
    "| case | submitted | completed | failed | lost | duplicate final writes | provider calls | attempts "
    "| longest stuck | wall time | notes |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def verdict(cluster: Cluster, case: str, outcome: Outcome, started: float, notes: str = "") -> CaseReport:
    """Check the invariant and measure: every accepted task finished exactly once, calls <= attempts."""
    ids = list(outcome.accepted.values())
    rows = {
        task_id: (status, attempts, prompt)
        for task_id, status, attempts, prompt in cluster.query(
            "SELECT id, status, attempts, prompt FROM tasks WHERE id = ANY(%s)", ids
        )
    }
    finals = dict(
        cluster.query(
            "SELECT task_id, count(*) FROM fault_audit WHERE new_status IN %s AND task_id = ANY(%s) GROUP BY task_id",
            FINISHED,
            ids,
        )
    )
    writes_after_final = cluster.query("SELECT count(*) FROM fault_audit WHERE old_status IN %s", FINISHED)[0][0]
    calls = cluster.provider_calls()
    lost = sum(1 for task_id in ids if task_id not in rows or rows[task_id][0] not in FINISHED)
    duplicates = sum(max(0, count - 1) for count in finals.values()) + writes_after_final
    over_called = [task_id for task_id, (_, attempts, prompt) in rows.items() if calls.get(prompt, 0) > attempts]
    longest = cluster.monitor.finish() if cluster.monitor else 0.0
    report = CaseReport(
        case=case,
        submitted=len(ids),
        completed=sum(1 for s, _, _ in rows.values() if s == "COMPLETED"),
        failed=sum(1 for s, _, _ in rows.values() if s == "FAILED"),
        lost=lost,
        duplicate_final_writes=duplicates,
        provider_calls=sum(calls.get(prompt, 0) for _, _, prompt in rows.values()),
        attempts=sum(a for _, a, _ in rows.values()),
        over_called=len(over_called),
        longest_stuck=longest,
        longest_stuck_task=cluster.monitor.longest_task if cluster.monitor else None,
        longest_stuck_why=cluster.monitor.longest_why if cluster.monitor else "",
        seconds=time.monotonic() - started,
        notes=notes,
    )
    extra = cluster.query("SELECT count(*) FROM tasks WHERE NOT (id = ANY(%s))", ids)[0][0]
    (cluster.logs / "reports.jsonl").open("a").write(json.dumps(report.__dict__) + "\n")
    assert not outcome.bad, outcome.bad[:5]
    assert lost == 0, f"{lost} accepted tasks are not finished"
    assert duplicates == 0, f"{duplicates} duplicate final writes"
    assert not over_called, f"tasks called more often than their attempts: {over_called[:10]}"
    assert extra == 0, f"{extra} tasks exist that no client was given"
    # Liveness, not speed: with the suite's clocks every orphan has a way forward within about
    # 10 s (a lease, a sweep, the scheduler slack); 30 s leaves room for a loaded machine.
    monitor = cluster.monitor
    assert longest < STUCK_BOUND, f"task {monitor.longest_task} ({monitor.longest_why}) sat unheld for {longest:.0f} s"
    return report
