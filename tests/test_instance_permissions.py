"""The embedded path keeps its data private: instance/ is 0700, and what is in it (the SQLite
file, the generated secret key, the embedded Valkey's files and socket) is 0600, whatever the
umask, and an instance/ made by an older version is tightened at the next start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from redis import Redis

from tests.helpers import EMBEDDED_UNSET, ROOT, loose_modes


def bootstrap(instance: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_UNSET}
    env.update(INSTANCE_PATH=str(instance), PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "bootstrap"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        preexec_fn=lambda: os.umask(0o022),  # the usual umask: files would be world-readable
    )


def test_the_database_and_the_secret_key_are_private(tmp_path):
    instance = tmp_path / "instance"
    bootstrap(instance)
    assert (instance / "app.db").exists() and (instance / "secret_key").exists()
    assert loose_modes(instance) == []


def test_an_older_loose_instance_is_tightened(tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o755)
    (instance / "app.db").touch(mode=0o644)
    (instance / "secret_key").write_text("k" * 64)
    (instance / "secret_key").chmod(0o644)
    bootstrap(instance)
    assert loose_modes(instance) == []


def test_the_embedded_valkeys_files_and_socket_are_private(tmp_path):
    from webapp.supervisor import start_valkey

    instance = tmp_path / "instance"
    previous = os.umask(0o022)
    try:
        server = start_valkey(instance)
        try:
            client = Redis(unix_socket_path=str(instance / "valkey.sock"))
            client.set("k", "v")
            client.save()  # an RDB file as well as the append-only files
            assert stat.S_ISSOCK((instance / "valkey.sock").lstat().st_mode)
            assert loose_modes(instance) == []
        finally:
            server.stop()
    finally:
        os.umask(previous)
    assert os.umask(previous) == previous  # the process's umask is left as it was
