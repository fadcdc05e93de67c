"""The production proxy (deploy/nginx.conf.template, docker-compose.yml's `proxy`), run for real:
Debian's nginx with the template as compose fills it in, in front of the app. Only the ports,
the certificate's folder and the header timeout (shortened) differ from production.

It must pass `nginx -t`, speak TLS and tell the app so (Secure cookies, HSTS), answer no other
host name, send plain http to https, refuse big bodies, and cut a client that trickles its
headers, which gunicorn's threads would otherwise wait for.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from tests.helpers import ROOT, app_with, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NAME = "tasks.example.test"
HEADER_TIMEOUT = 2  # seconds; production: 10

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists() or not shutil.which("openssl"),
    reason="no nginx or openssl: `make test` installs Debian's nginx-light and openssl",
)


def render(template: str, upstream: str, http_port: int, https_port: int, certs: Path) -> str:
    """The template as the nginx image's envsubst fills it in, on test ports and certificates."""
    conf = template.replace("${SERVER_NAME}", NAME).replace("${APP_UPSTREAM}", upstream)
    assert "${" not in conf, "a template variable compose does not set"
    replacements = {
        "listen 80": f"listen 127.0.0.1:{http_port}",
        "listen 443": f"listen 127.0.0.1:{https_port}",
        "/etc/nginx/certs/": f"{certs}/",
        "client_header_timeout 10s;": f"client_header_timeout {HEADER_TIMEOUT}s;",
    }
    for old, new in replacements.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    return conf


@pytest.fixture(scope="module")
def proxy(app, tmp_path_factory):
    """nginx with the production template in front of the app (TRUSTED_PROXIES=1, TRUSTED_HOSTS)."""
    folder = tmp_path_factory.mktemp("nginx")
    certs = folder / "certs"
    certs.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={NAME}"]
        + ["-addext", f"subjectAltName=DNS:{NAME}", "-keyout", str(certs / "privkey.pem")]
        + ["-out", str(certs / "fullchain.pem")],
        check=True,
        capture_output=True,
    )
    served = app_with(app, TRUSTED_PROXIES=1, TRUSTED_HOSTS=[NAME])
    httpd = make_server("127.0.0.1", 0, served, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    http_port, https_port = free_port(), free_port()
    template = (ROOT / "deploy" / "nginx.conf.template").read_text()
    (folder / "app.conf").write_text(render(template, f"127.0.0.1:{httpd.server_port}", http_port, https_port, certs))
    (folder / "nginx.conf").write_text(
        f"""user root;
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/app.conf;
}}
"""
    )
    command = [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the production template passes nginx's own check
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
            time.sleep(0.05)
    context = ssl.create_default_context(cafile=str(certs / "fullchain.pem"))
    yield {"http": http_port, "https": https_port, "tls": context, "log": folder / "error.log"}
    server.terminate()
    server.wait(10)
    httpd.shutdown()


def tls_socket(proxy) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy["https"]), timeout=30)
    return proxy["tls"].wrap_socket(raw, server_hostname=NAME)


def read_all(sock) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def https(proxy, path: str, host: str = NAME, extra: bytes = b"") -> bytes:
    with tls_socket(proxy) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode() + extra + b"\r\n")
        return read_all(sock)


def test_tls_reaches_the_app_which_knows_it_came_over_https(proxy):
    answer = https(proxy, "/api/v1/health")
    head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 200"), head
    assert "strict-transport-security: max-age=" in head  # the app saw X-Forwarded-Proto: https
    assert "server: nginx\r\n" in head + "\r\n"  # no version (server_tokens off)
    login = https(proxy, "/login").split(b"\r\n\r\n", 1)[0].decode().lower()
    assert "set-cookie: session=" in login and "; secure" in login


def test_plain_http_is_sent_to_https(proxy):
    with socket.create_connection(("127.0.0.1", proxy["http"]), timeout=10) as sock:
        sock.sendall(f"GET /tasks?x=1 HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        head = read_all(sock).split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 301") and f"Location: https://{NAME}/tasks?x=1" in head


def test_another_host_name_gets_no_answer(proxy):
    assert https(proxy, "/", host="evil.example") == b""  # nginx's 444: the connection is closed
    raw = socket.create_connection(("127.0.0.1", proxy["https"]), timeout=10)
    with pytest.raises(ssl.SSLError):  # a TLS hello for another name gets no certificate
        proxy["tls"].wrap_socket(raw, server_hostname="evil.example")
    raw.close()


def test_a_body_over_the_limit_is_refused_by_the_proxy(proxy):
    with tls_socket(proxy) as sock:
        sock.sendall(
            f"POST /api/v1/tasks HTTP/1.1\r\nHost: {NAME}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {3 * 1024 * 1024}\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_all(sock).startswith(b"HTTP/1.1 413")


def test_a_batch_file_may_be_larger_up_to_its_own_limit(proxy):
    """/api/v1/files takes a 200 MiB file: a 3 MiB one reaches the app; past 201 MiB the proxy refuses."""
    body = b"x" * (3 * 1024 * 1024)
    with tls_socket(proxy) as sock:
        sock.sendall(
            f"POST /api/v1/files HTTP/1.1\r\nHost: {NAME}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # the app's answer: no token
    with tls_socket(proxy) as sock:
        sock.sendall(
            f"POST /api/v1/files HTTP/1.1\r\nHost: {NAME}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {202 * 1024 * 1024}\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_all(sock).startswith(b"HTTP/1.1 413")


def test_a_client_trickling_its_headers_is_cut_off(proxy):
    """The slowloris of the probe: a header line now and then, never the end of the headers."""
    sock = tls_socket(proxy)
    sock.sendall(f"GET /api/v1/health HTTP/1.1\r\nHost: {NAME}\r\n".encode())
    sock.settimeout(0.5)
    closed = False
    deadline = time.monotonic() + HEADER_TIMEOUT * 10  # a bound for the test, not the figure tested
    while time.monotonic() < deadline and not closed:
        try:
            sock.sendall(b"X-Trickle: a\r\n")
            closed = sock.recv(1024) == b""
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            closed = True
    sock.close()
    assert closed, "the proxy kept a connection that never finished its headers"


def test_compose_puts_the_proxy_in_front_and_publishes_nothing_else():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}, published
    mounts = dict(volume.split(":")[:2] for volume in services["proxy"]["volumes"])
    assert mounts["./deploy/nginx.conf.template"] == "/etc/nginx/templates/default.conf.template"
    assert (ROOT / "deploy" / "nginx.conf.template").exists()
    assert services["proxy"]["environment"]["APP_UPSTREAM"] == "web:5000"
    app_env = compose["x-app-env"]
    assert app_env["TRUSTED_PROXIES"] == 1 and app_env["TRUSTED_HOSTS"].startswith("${SERVER_NAME")
