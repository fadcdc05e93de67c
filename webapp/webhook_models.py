"""The webhook record: users' endpoints, and the outbox of deliveries to them.

A delivery row is written in the same transaction as the change it tells of (a task or batch
finishing), so PostgreSQL holds every event that happened and none that did not; RQ jobs only
wake the delivery workers up (`jobs/deliver.py`).
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, SmallInteger, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .extensions import db
from .models import BigId, JsonDoc, UTCDateTime, _iso, utcnow

EVENT_TYPES = (
    "task.completed",
    "task.failed",
    "task.cancelled",
    "batch.completed",
    "batch.failed",
    "batch.cancelled",
    "batch.expired",
)
# Sent by "Send a test event" on the Webhooks page, whatever the endpoint subscribes to.
TEST_EVENT = "webhook.test"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookEndpoint(db.Model):
    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(200))
    events: Mapped[list] = mapped_column(JsonDoc, default=list)
    # "whsec_" + base64 of 32 random bytes. Kept as is: signing needs it (Standard Webhooks).
    secret: Mapped[str] = mapped_column(String(100))
    # The secret before the last rotation; deliveries carry its signature too until it expires.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The first failed try since the last delivered one; None while the endpoint answers.
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(Text)

    deliveries: Mapped[list[WebhookDelivery]] = relationship(
        back_populates="endpoint", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None

    def to_dict(self) -> dict:
        """Return the endpoint as the API shows it: never its secret."""
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events or []),
            "description": self.description,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "created_at": _iso(self.created_at),
            "failing_since": _iso(self.failing_since),
        }


class WebhookDelivery(db.Model):
    """One event for one endpoint: the signed body, and where its tries stand."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        # The page's log: an endpoint's deliveries, newest first.
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
        # The backstop's scan and the oldest-undelivered gauge read pending rows only.
        Index(
            "ix_webhook_deliveries_pending",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    # webhook-id: the same on every try, so receivers can drop repeats.
    message_id: Mapped[str] = mapped_column(String(40), unique=True)
    event_type: Mapped[str] = mapped_column(String(40))
    # What the event is about, for the log: "task 12", "batch batch_abc".
    subject: Mapped[str] = mapped_column(String(100))
    # The exact body sent and signed on every try.
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A try in progress holds the row until then; a worker that died lets it go.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_duration_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    endpoint: Mapped[WebhookEndpoint] = relationship(back_populates="deliveries")

    @property
    def outcome(self) -> str:
        """Return what the last try said, in a few words."""
        if self.status == DeliveryStatus.DELIVERED.value:
            return f"delivered ({self.last_status_code})"
        if self.last_status_code is not None:
            return f"HTTP {self.last_status_code}"
        return self.last_error or "not tried yet"
