"""The batch record: uploaded files (content in chunks), batches in OpenAI's shape, and their lines' errors.

A file's content is kept in PostgreSQL, in `file_chunks` rows of at most CHUNK_BYTES, so every
web and worker machine reads the same bytes and no process ever holds a whole file. A batch's
output and error files have no chunks: their content is made from the batch's task rows when it
is read (`webapp/batch_content.py`), so answers are not stored twice.
"""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db
from .models import BigId, JsonDoc, UTCDateTime, utcnow

# A stored chunk of a file's content; lines may straddle two chunks.
CHUNK_BYTES = 4 * 1024 * 1024


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# Batches whose lines may still run or be written: their input file cannot be deleted.
ACTIVE_BATCH = (
    BatchStatus.VALIDATING.value,
    BatchStatus.IN_PROGRESS.value,
    BatchStatus.FINALIZING.value,
    BatchStatus.CANCELLING.value,
)
ENDED_BATCH = (
    BatchStatus.FAILED.value,
    BatchStatus.COMPLETED.value,
    BatchStatus.EXPIRED.value,
    BatchStatus.CANCELLED.value,
)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def epoch(value: datetime | None) -> int | None:
    """Return a time as OpenAI's objects carry it: whole seconds since 1970 (UTC)."""
    return None if value is None else int(value.astimezone(UTC).timestamp())


class StoredFile(db.Model):
    """A file as OpenAI's Files API shows it: an upload (purpose batch) or a batch's output or errors."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint("kind IN ('upload', 'output', 'error')", name="kind"),
        Index("ix_files_user_id_created_at", "user_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_file_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    # upload: the content is in file_chunks; output/error: made from the tasks of `batch_id`.
    kind: Mapped[str] = mapped_column(String(8), default="upload")
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_dict(self) -> dict:
        """Return the file as OpenAI's Files API does."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": epoch(self.created_at),
            "expires_at": None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class FileChunk(db.Model):
    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(db.Model):
    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired',"
            " 'cancelling', 'cancelled')",
            name="status",
        ),
        Index("ix_batches_user_id_created_at", "user_id", "created_at"),
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_batch_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.VALIDATING.value)
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(8))
    # Not a foreign key: a finished batch keeps naming its input after the file is deleted.
    input_file_id: Mapped[str] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    # jsonl, or csv when the page converted a CSV upload (its results can be downloaded as CSV).
    input_format: Mapped[str] = mapped_column(String(8), default="jsonl")
    # The model the page's form chose for lines that name none (CSV uploads).
    model: Mapped[str | None] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(SmallInteger, default=2)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JsonDoc)
    # Whole-file validation errors: [{code, message, line, param}]; the batch failed for them.
    errors: Mapped[list | None] = mapped_column(JsonDoc)
    # The file's lines; completed and failed are written when the batch ends (counted from its
    # tasks and line errors until then).
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_BATCH

    def to_dict(self, counts: dict | None = None) -> dict:
        """Return the batch as OpenAI's Batch API does; `counts` are the live request_counts."""
        counts = counts or {"total": self.total, "completed": self.completed, "failed": self.failed}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": epoch(self.created_at),
            "in_progress_at": epoch(self.in_progress_at),
            "expires_at": epoch(self.expires_at),
            "finalizing_at": epoch(self.finalizing_at),
            "completed_at": epoch(self.completed_at),
            "failed_at": epoch(self.failed_at),
            "expired_at": epoch(self.expired_at),
            "cancelling_at": epoch(self.cancelling_at),
            "cancelled_at": epoch(self.cancelled_at),
            "request_counts": counts,
            "metadata": self.metadata_,
        }


class BatchLineError(db.Model):
    """A line that parsed but cannot run (unknown model, too long, a refused parameter): it goes to the error file."""

    __tablename__ = "batch_line_errors"
    __table_args__ = (Index("ix_batch_line_errors_batch_id_line", "batch_id", "line"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
