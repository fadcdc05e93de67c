"""gunicorn settings shared by `make run` and the Docker image (gunicorn reads ./gunicorn.conf.py).

Workers and threads. Pages and API calls are short, but an event stream
(GET /api/v1/tasks/<id>/events) holds its thread for as long as the client follows the task.
A gthread worker's threads cost about 0.4 MiB each and sit idle in a wait until their row
changes (one watcher thread per process reads every followed row: webapp/streams.py), so
threads are what holds hundreds of streams: WEB_THREADS (256) per process, of which at most
STREAMS_PER_PROCESS (WEB_THREADS - 56 = 200) may be streams; the other 56 always serve pages. A process at its
stream cap answers one more stream with 503 and Retry-After. gevent would hold more, but it
patches every socket of the app (psycopg2 needs its own wait callback) for a gain we do not need
at this size; docs/performance.md has the figures (bench/streams.py).

The access log names the path without its query string, and no referrer: query strings hold
what users typed (History's prompt search) and, from a misbehaving client, perhaps an API token
(the API refuses tokens in URLs, but the request line would still be logged). What remains is
enough to follow traffic: client, time, method, path, status, size, duration, user agent.

gunicorn answers requests it cannot parse (a request line or headers over its limits, garbage)
itself, before the app sees them. Its page quotes the limit and the offending text and carries
none of the app's headers; `write_error` below replaces it (gunicorn has no setting for that):
a fixed sentence per status, as plain text, with the headers every answer of the app has.
"""

import os

import gunicorn.util

# Threads of each process that streams can never take.
PAGE_THREADS = 56

worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "256"))
# The app reads its stream cap from the environment: keep it below the threads.
os.environ.setdefault("STREAMS_PER_PROCESS", str(max(1, threads - PAGE_THREADS)))
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'
# The control socket (gunicornc) lives under instance/ (INSTANCE_PATH, as webapp/config.py reads
# it), beside the app's other runtime files: gunicorn's default is one per user
# (~/.gunicorn/gunicorn.ctl), so a second copy of the app on the machine took over the first's.
control_socket = os.path.join(
    os.environ.get("INSTANCE_PATH") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance"),
    "gunicorn.ctl",
)


def post_worker_init(worker):
    """End a worker's event streams as soon as it is asked to stop (SIGTERM), so they hold up no restart."""
    import signal

    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):
        from webapp import streams

        streams.stop_all()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop)


ERROR_TEXT = {
    400: "The request could not be read.",
    403: "The request was refused.",
    414: "The address is too long.",
    417: "The expectation cannot be met.",
    431: "The request's headers are too large.",
    500: "Something went wrong on our side.",
    501: "That transfer coding is not supported.",
}
# The same as webapp/security.py gives JSON and text answers (gunicorn runs before the app).
ERROR_HEADERS = (
    "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: same-origin\r\n"
    "Cache-Control: no-store\r\n"
)


def write_error(sock, status_int, reason, mesg):
    """Answer a request gunicorn refused: its status, one sentence, our headers; nothing of the request."""
    body = (ERROR_TEXT.get(status_int, "The request could not be handled.") + "\n").encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{ERROR_HEADERS}\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = write_error
