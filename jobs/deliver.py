"""One try of one webhook delivery: claim the row, sign, POST, record the outcome.

Runs on the `webhooks` queue, served by a worker of its own (`flask --app wsgi worker
webhooks`), so a slow receiver holds a delivery thread, never an AI task's.

- The row is claimed atomically (status pending, due, no live lease), so a duplicate job sends
  nothing; the lease lets the sweep retry a try whose worker died.
- Signed per Standard Webhooks: `webhook-id` (the same on every try), `webhook-timestamp` (this
  try's), `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, and the old
  secret's too while a rotation's overlap lasts).
- The connection goes through `webapp.netguard.GuardedBackend`: the address is checked again and
  connected to as checked; WEBHOOK_TIMEOUT bounds the whole try; redirects are not followed.
- 2xx is delivered. Anything else is a failed try, retried after the next of
  WEBHOOK_RETRY_DELAYS (a Retry-After that asks for longer is honoured), failed after the last.
  410 Gone disables the endpoint at once; an endpoint whose every try failed for
  WEBHOOK_DISABLE_AFTER_DAYS is disabled too, and its pending deliveries fail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpcore2
from flask import current_app
from sqlalchemy import bindparam, func, select, update

from webapp import __version__, outbox
from webapp.extensions import db
from webapp.metrics import Batch
from webapp.models import UTCDateTime, utcnow
from webapp.netguard import GuardedBackend, RefusedError
from webapp.webhook_models import DeliveryStatus, WebhookDelivery, WebhookEndpoint

log = logging.getLogger(__name__)

_d = WebhookDelivery.__table__
_e = WebhookEndpoint.__table__
LEASE_SECONDS = 60
# How long a job waits for a row that is not there yet: it is enqueued as the transaction that
# writes the row commits, and may run a moment before that commit is visible.
VISIBILITY_WAIT = 2.0
RETRY_AFTER_MAX = 24 * 3600
USER_AGENT = f"AsyncAITaskRunner-Webhooks/{__version__}"

_CLAIM = (
    update(_d)
    .where(
        _d.c.id == bindparam("b_id"),
        _d.c.status == DeliveryStatus.PENDING.value,
        _d.c.next_attempt_at <= bindparam("b_due", type_=UTCDateTime()),
        (_d.c.lease_until.is_(None)) | (_d.c.lease_until < bindparam("b_now", type_=UTCDateTime())),
    )
    .values(
        lease_until=bindparam("b_lease", type_=UTCDateTime()),
        attempts=_d.c.attempts + 1,
        last_attempt_at=bindparam("b_now", type_=UTCDateTime()),
    )
    .returning(_d.c.endpoint_id, _d.c.message_id, _d.c.payload, _d.c.attempts, _d.c.event_type)
)


@dataclass(frozen=True)
class Outcome:
    """What one try got back."""

    status_code: int | None
    error: str | None
    duration_ms: int
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """Return a Standard Webhooks v1 signature of one try."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_delays() -> list[float]:
    """Return WEBHOOK_RETRY_DELAYS as seconds (checked when the app was made)."""
    return outbox.parse_delays(current_app.config["WEBHOOK_RETRY_DELAYS"])


def deliver(delivery_id: int) -> str:
    """Make one try of a delivery, if it is due and no one else is trying it; say what happened."""
    claimed = _claim(delivery_id)
    if claimed is None:
        return "nothing to do"
    endpoint = db.session.execute(select(_e).where(_e.c.id == claimed.endpoint_id)).first()
    db.session.commit()
    if endpoint is None:
        return "endpoint deleted"
    if endpoint.disabled_at is not None:
        _finish(delivery_id, DeliveryStatus.FAILED, Outcome(None, "The endpoint is disabled.", 0))
        return "endpoint disabled"
    outcome = send(endpoint, claimed.message_id, claimed.payload)
    return _record(delivery_id, endpoint, claimed.attempts, outcome)


def _try_claim(delivery_id: int):
    now = utcnow()
    params = {
        "b_id": delivery_id,
        "b_now": now,
        "b_due": now + timedelta(seconds=1),
        "b_lease": now + timedelta(seconds=LEASE_SECONDS),
    }
    row = db.session.execute(_CLAIM, params).first()
    db.session.commit()
    return row


def _claim(delivery_id: int):
    """Claim the row for one try; wait up to VISIBILITY_WAIT for the commit that writes it."""
    waited = 0.0
    pause = 0.02
    while True:
        row = _try_claim(delivery_id)
        if row is not None:
            return row
        exists = db.session.scalar(select(func.count()).where(_d.c.id == delivery_id))
        db.session.commit()
        if exists:
            # It may have been committed between the claim and this look (the job is enqueued as
            # the commit begins): once seen, it stays visible, so one more claim decides.
            return _try_claim(delivery_id)  # None: delivered, failed, not due, or being tried
        if waited >= VISIBILITY_WAIT:
            return None  # never committed: the change rolled back
        time.sleep(pause)
        waited += pause
        pause = min(pause * 2, 0.5)


def send(endpoint, message_id: str, body: str) -> Outcome:
    """POST one signed try to the endpoint and return what came back (never raises for the network)."""
    config = current_app.config
    now = utcnow()
    timestamp = int(now.timestamp())
    signatures = [sign(endpoint.secret, message_id, timestamp, body)]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and _aware(expires) > now:
        signatures.append(sign(endpoint.previous_secret, message_id, timestamp, body))
    headers = [
        (b"Content-Type", b"application/json"),
        (b"User-Agent", USER_AGENT.encode()),
        (b"webhook-id", message_id.encode()),
        (b"webhook-timestamp", str(timestamp).encode()),
        (b"webhook-signature", " ".join(signatures).encode()),
    ]
    seconds = float(config["WEBHOOK_TIMEOUT"])
    backend = GuardedBackend(bool(config["WEBHOOK_ALLOW_LOOPBACK"]), seconds)
    started = time.monotonic()
    timeout = {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}
    try:
        with (
            httpcore2.ConnectionPool(network_backend=backend, max_connections=1, retries=0) as pool,
            pool.stream(
                "POST", endpoint.url, headers=headers, content=body.encode(), extensions={"timeout": timeout}
            ) as response,
        ):
            code = response.status
            retry_after = _retry_after(response.headers)
        return Outcome(code, None if 200 <= code < 300 else f"HTTP {code}", _ms(started), retry_after)
    except RefusedError as exc:
        return Outcome(None, f"Refused before connecting: {exc}.", _ms(started))
    except httpcore2.TimeoutException:
        return Outcome(None, f"No answer within {seconds:g} s.", _ms(started))
    except (httpcore2.NetworkError, httpcore2.ProtocolError, httpcore2.UnsupportedProtocol, OSError) as exc:
        return Outcome(None, f"Connection failed: {exc or type(exc).__name__}.", _ms(started))


def _record(delivery_id: int, endpoint, attempts: int, outcome: Outcome) -> str:
    now = utcnow()
    config = current_app.config
    if outcome.delivered:
        _finish(delivery_id, DeliveryStatus.DELIVERED, outcome)
        db.session.execute(update(_e).where(_e.c.id == endpoint.id).values(failing_since=None))
        db.session.commit()
        Batch().inc("atr_webhook_deliveries", outcome="delivered").send()
        return "delivered"
    failing_since = _aware(endpoint.failing_since) if endpoint.failing_since else now
    db.session.execute(update(_e).where(_e.c.id == endpoint.id, _e.c.failing_since.is_(None)).values(failing_since=now))
    days = config["WEBHOOK_DISABLE_AFTER_DAYS"]
    if outcome.status_code == 410:
        _disable(endpoint.id, "The receiver answered 410 Gone: it asked for no more deliveries.")
    elif failing_since <= now - timedelta(days=days):
        _disable(endpoint.id, f"Every delivery failed for {days} days (since {failing_since:%Y-%m-%d %H:%M} UTC).")
    else:
        delays = retry_delays()
        if attempts <= len(delays):
            delay = delays[attempts - 1] * random.uniform(1.0, 1.1)  # jitter: receivers recovering are not stampeded
            if outcome.retry_after:
                delay = max(delay, min(outcome.retry_after, RETRY_AFTER_MAX))
            _retry_later(delivery_id, outcome, now + timedelta(seconds=delay))
            db.session.commit()
            outbox.enqueue(delivery_id, delay)
            Batch().inc("atr_webhook_deliveries", outcome="retried").send()
            return f"failed, next try in {delay:.0f} s"
    _finish(delivery_id, DeliveryStatus.FAILED, outcome)
    db.session.commit()
    Batch().inc("atr_webhook_deliveries", outcome="failed").send()
    return "failed"


def _finish(delivery_id: int, status: DeliveryStatus, outcome: Outcome) -> None:
    db.session.execute(
        update(_d)
        .where(_d.c.id == delivery_id)
        .values(status=status.value, finished_at=utcnow(), lease_until=None, **_outcome_values(outcome))
    )
    db.session.commit()


def _retry_later(delivery_id: int, outcome: Outcome, when: datetime) -> None:
    db.session.execute(
        update(_d)
        .where(_d.c.id == delivery_id)
        .values(next_attempt_at=when, lease_until=None, **_outcome_values(outcome))
    )


def _outcome_values(outcome: Outcome) -> dict:
    return dict(
        last_status_code=outcome.status_code,
        last_error=None if outcome.delivered else (outcome.error or "")[:500],
        last_duration_ms=outcome.duration_ms,
    )


def _disable(endpoint_id: int, reason: str) -> None:
    """Disable an endpoint and fail what still waits for it."""
    now = utcnow()
    db.session.execute(update(_e).where(_e.c.id == endpoint_id).values(disabled_at=now, disabled_reason=reason))
    db.session.execute(
        update(_d)
        .where(_d.c.endpoint_id == endpoint_id, _d.c.status == DeliveryStatus.PENDING.value)
        .values(status=DeliveryStatus.FAILED.value, finished_at=now, lease_until=None, last_error=f"Not sent: {reason}")
    )
    db.session.commit()
    log.warning("webhooks: endpoint %s disabled: %s", endpoint_id, reason)


def _retry_after(headers) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: the schedule decides
    return None


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
