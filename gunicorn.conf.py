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
"""

import os

# Threads of each process that streams can never take.
PAGE_THREADS = 56

worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "256"))
# The app reads its stream cap from the environment: keep it below the threads.
os.environ.setdefault("STREAMS_PER_PROCESS", str(max(1, threads - PAGE_THREADS)))
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'


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
