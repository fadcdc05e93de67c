"""Configuration: defaults here, then the environment (and `.env`), then test overrides."""

from __future__ import annotations

import json
import os
import secrets
from decimal import Decimal
from pathlib import Path

from .money import parse_budget

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = Path(os.environ.get("INSTANCE_PATH", ROOT / "instance"))


# Views that take a whole file (a batch's JSONL or CSV): their bodies may be as large as
# FILE_MAX_BYTES plus room for the multipart envelope; every other body keeps MAX_CONTENT_LENGTH.
UPLOAD_ENDPOINTS = frozenset({"api.create_file", "batches.upload"})
UPLOAD_ENVELOPE_BYTES = 1024 * 1024


class Config:
    """Embedded defaults: a fresh machine needs no configuration at all."""

    APP_NAME = "Async AI Task Runner"
    # "production" refuses to start without SECRET_KEY; anything else may generate one.
    APP_ENV = "development"
    SECRET_KEY: str | None = None

    # Unset DATABASE_URL means the embedded SQLite file under instance/.
    DATABASE_URL: str | None = None
    # Unset REDIS_URL means the embedded Valkey that `make run` starts on a socket under instance/.
    REDIS_URL: str | None = None

    MODELS_FILE: str | None = None
    DEFAULT_MODEL = "local"
    # The monthly budget in US dollars of users who have none of their own; unset or "none"
    # means no limit (docs/costs.md).
    DEFAULT_MONTHLY_BUDGET_USD: str | None = None
    # Where the built-in `local` model's server listens (started by `make run` / compose).
    LOCAL_MODEL_URL = "http://127.0.0.1:8091/v1"
    LOCAL_MODEL_THREADS = 2
    LOCAL_MODEL_PARALLEL = 2
    PORT = 5000

    PROMPT_MAX_CHARS = 32_000
    MAX_CONTENT_LENGTH = 1024 * 1024
    # API JSON bodies nested deeper than this are refused before parsing (webapp/json_depth.py).
    JSON_MAX_DEPTH = 32
    # Attempts a task gets (each provider call is one); user retries add as many again.
    TASK_MAX_ATTEMPTS = 3
    RETRY_BASE_SECONDS = 2.0
    RETRY_MAX_SECONDS = 300.0
    # A worker holds a task for this long and renews it while it works.
    LEASE_SECONDS = 30
    PROGRESS_INTERVAL = 1.0
    # A task orphaned by a dead worker runs again within LEASE_SECONDS + SWEEP_INTERVAL.
    SWEEP_INTERVAL = 15
    # A PENDING task this old with no job in any queue is re-enqueued by the sweeper.
    SWEEP_GRACE_SECONDS = 30
    IDEMPOTENCY_TTL_HOURS = 24
    # Finished tasks are deleted this many days after they finish (0 keeps them forever);
    # the scheduler checks every CLEANUP_INTERVAL seconds.
    RETENTION_DAYS = 7
    CLEANUP_INTERVAL = 3600
    # A 429 asking to wait at most this long is waited out by the worker; longer, the task is
    # handed back with a delayed retry so the worker can take other work.
    RETRY_INLINE_MAX_SECONDS = 5.0
    # Circuit breaker per model, shared by all workers through Redis: this many transient
    # failures in a row pause the model for BREAKER_OPEN_SECONDS (doubling while probes fail).
    BREAKER_FAILURES = 5
    BREAKER_OPEN_SECONDS = 15.0
    BREAKER_MAX_OPEN_SECONDS = 120.0
    # Tasks one worker process runs at once, each in a thread of its own (`flask worker --concurrency`).
    WORKER_CONCURRENCY = 32
    # On SIGTERM a worker finishes what it runs within this many seconds or hands it back.
    SHUTDOWN_GRACE_SECONDS = 40.0
    # How long a worker keeps retrying a database write (claim, final answer) while the
    # database is unreachable, before it leaves the task to the sweeper.
    DB_RETRY_SECONDS = 60.0

    # The host names this server answers for, comma-separated ("tasks.example.org", ".example.org"
    # for every subdomain). Another Host header is a 400, never reflected into a redirect or a
    # link. Required with APP_ENV=production; unset elsewhere (any host, as `make run` needs).
    TRUSTED_HOSTS: list[str] | None = None

    # Set to the number of proxies in front of the app (1 behind one TLS proxy) so client
    # addresses and https are read from X-Forwarded-*; 0 trusts no such header.
    TRUSTED_PROXIES = 0

    # Rate limits (webapp/ratelimits.py), counted in Redis; false turns every one of them off.
    RATELIMIT_ENABLED = True
    # Failed sign-ins allowed (limits syntax: "5/minute;20/hour"); once over, sign-in waits,
    # right password or not. The strict limit counts one account from one address, so
    # someone else's failures elsewhere do not lock the owner out; the looser one counts an
    # account from everywhere (a guesser with many addresses); the last, one address trying
    # many accounts. docs/security.md, "Sign-in throttling", weighs them.
    LOGIN_LIMIT_PER_ACCOUNT_AND_ADDRESS = "5/minute;20/hour"
    LOGIN_LIMIT_PER_ACCOUNT = "30/minute;200/hour"
    LOGIN_LIMIT_PER_ADDRESS = "20/minute;100/hour"
    # Submissions (and retries) per user, pages and API together; empty means no limit.
    SUBMIT_LIMIT = "60/minute"
    # Unfinished (PENDING or PROCESSING) tasks a user may have at once; 0 means no limit.
    MAX_TASKS_IN_FLIGHT = 100
    # Tasks per page on the History page.
    HISTORY_PAGE_SIZE = 20
    # A sign-in unused this long ends (webapp/services/sessions.py); its last use is written
    # at most once per SESSION_TOUCH_SECONDS, so a page view costs one read.
    SESSION_IDLE_DAYS = 14
    SESSION_TOUCH_SECONDS = 3600
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    # Cookies are Secure whenever the request came over HTTPS (directly, or through a trusted
    # proxy's X-Forwarded-Proto: see TRUSTED_PROXIES); True makes them Secure always.
    SESSION_COOKIE_SECURE = False
    # Strict-Transport-Security max-age sent on HTTPS responses; 0 sends none.
    HSTS_SECONDS = 31_536_000
    REMEMBER_COOKIE_HTTPONLY = True
    REMEMBER_COOKIE_SAMESITE = "Lax"
    # CSRF tokens last as long as the session, so a page left open still submits.
    WTF_CSRF_TIME_LIMIT = None

    # Webhooks (docs/webhooks.md). Seconds between tries after a failed one, comma-separated:
    # one try now and one after each delay, then the delivery is marked failed.
    WEBHOOK_RETRY_DELAYS = "5,300,1800,7200,18000,36000,36000"
    # Receivers on loopback (127.0.0.0/8, ::1) are refused unless this is true: development and tests.
    WEBHOOK_ALLOW_LOOPBACK = False
    # Seconds one try may take in all (connect, send, the answer's status line and headers).
    WEBHOOK_TIMEOUT = 10.0
    WEBHOOK_MAX_ENDPOINTS = 10
    # An endpoint whose every try failed for this many days is disabled, with a notice.
    WEBHOOK_DISABLE_AFTER_DAYS = 5
    # After a secret is rotated, deliveries are signed with the old one too for this many hours.
    WEBHOOK_SECRET_OVERLAP_HOURS = 24
    # Deliveries one webhook worker process sends at once (`flask worker webhooks`), each in a thread.
    WEBHOOK_CONCURRENCY = 16
    # Batches (docs/batches.md): an uploaded file's limits, in bytes and lines.
    FILE_MAX_BYTES = 200 * 1024 * 1024
    FILE_MAX_LINES = 50_000
    FILE_LINE_MAX_BYTES = 1024 * 1024
    # Batches a user may have unfinished (validating, in progress, finalizing) at once; 0: no limit.
    BATCH_MAX_ACTIVE = 10
    # The priority of a batch's tasks: the low lane (1-3), behind interactive work.
    BATCH_PRIORITY = 2
    # Event streams (GET /api/v1/tasks/<id>/events) one web process holds at once; each holds a
    # gunicorn thread, so this stays below the threads (gunicorn.conf.py, WEB_THREADS) to leave
    # threads for pages. One more is refused with 503 and Retry-After.
    STREAMS_PER_PROCESS = 200
    # Seconds between two looks at the rows that open streams follow (one query per web process).
    STREAM_POLL_INTERVAL = 0.25
    # Seconds between keep-alive comments on an idle stream.
    STREAM_KEEPALIVE_SECONDS = 15.0

    METRICS_ENABLED = True
    METRICS_TOKEN: str | None = None
    LOG_FORMAT = "text"
    LOG_LEVEL = "INFO"

    # pool_size covers a web process's threads (`make run`: 8), so a busy process keeps its
    # connections instead of opening and closing overflow ones (a PostgreSQL backend each); a
    # worker's threads share it too, for their claims and final writes, with 20 more under load.
    SQLALCHEMY_ENGINE_OPTIONS: dict = {"pool_size": 10, "max_overflow": 20}
    # A pooled connection idle this long is checked with a round trip before use (a restart or
    # an idle timeout may have cut it); one used more recently is not. 0 checks every time.
    DATABASE_PING_AFTER_IDLE = 1.0


TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, value: str, default):
    """Read an environment value as the type of its default (strings stay strings)."""
    if isinstance(default, bool):
        if value.strip().lower() not in TRUE | FALSE:
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value.strip().lower() in TRUE
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if isinstance(default, dict | list):
        return json.loads(value)
    if name == "TRUSTED_HOSTS":
        return [host.strip() for host in value.split(",") if host.strip()] or None
    return value


def from_environment(defaults: type) -> dict:
    """Return the settings of `defaults` (a class of upper-case names) that the environment sets."""
    return {
        name: _parse(name, os.environ[name], getattr(defaults, name))
        for name in dir(defaults)
        if name.isupper() and name in os.environ
    }


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed and make it 0700: only this user may enter it.

    instance/ holds every prompt, answer and password hash on the embedded path; an older
    version created it 0755, so an existing one is tightened too.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty if missing, mode 0600 from the first moment (no umask window); tighten it if it exists."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)
    return path


def monthly_budget(value) -> Decimal | None:
    """Read DEFAULT_MONTHLY_BUDGET_USD: dollars, or unset / "none" for no limit."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    try:
        return parse_budget(str(value))
    except ValueError as exc:
        raise ValueError(f"DEFAULT_MONTHLY_BUDGET_USD: {exc}") from None


def database_uri(url: str | None, instance: Path) -> str:
    """Return the SQLAlchemy URI for DATABASE_URL, or the embedded SQLite file (0600, in a 0700 folder)."""
    if not url:
        # SQLite gives its journal and WAL files the mode of the database file.
        database = private_file(private_dir(instance) / "app.db")
        return f"sqlite:///{database}"
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this project uses psycopg2.
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url[len(bare) :]
    return url


def redis_url(url: str | None, instance: Path) -> str:
    """Return REDIS_URL, or the socket of the embedded Valkey under instance/."""
    return url or f"unix://{instance / 'valkey.sock'}"


# Sessions and CSRF tokens are signed with it: a guessable key lets anyone sign in as anyone.
SECRET_KEY_MIN = 32
SECRET_KEY_ADVICE = (
    f"Set it to a random string of at least {SECRET_KEY_MIN} characters, for example the output of "
    "`python -c 'import secrets; print(secrets.token_hex(32))'`."
)


TRUSTED_HOSTS_ADVICE = (
    "Set TRUSTED_HOSTS to the host names this server answers for, comma-separated (for example "
    "TRUSTED_HOSTS=tasks.example.org), so a request with another Host header is refused rather than "
    "reflected into redirects."
)


def trusted_hosts(configured: list[str] | None, app_env: str) -> list[str] | None:
    """Return the trusted host names; production must name them."""
    if configured:
        return list(configured)
    if app_env == "production":
        raise RuntimeError(f"TRUSTED_HOSTS is not set. {TRUSTED_HOSTS_ADVICE}")
    return None


def secret_key(configured: str | None, app_env: str, instance: Path) -> str:
    """Return the secret key; outside production keep a generated one under instance/."""
    if configured:
        if app_env == "production" and len(configured) < SECRET_KEY_MIN:
            raise RuntimeError(f"SECRET_KEY is too short ({len(configured)} characters). {SECRET_KEY_ADVICE}")
        return configured
    if app_env == "production":
        raise RuntimeError(f"SECRET_KEY is not set. {SECRET_KEY_ADVICE}")
    path = private_dir(instance) / "secret_key"
    if not path.exists() or not path.read_text().strip():
        private_file(path).write_text(secrets.token_hex(32))
    return private_file(path).read_text().strip()
