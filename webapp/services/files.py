"""OpenAI's Files API: store an upload in PostgreSQL while reading it, list, read back, delete.

An upload is read line by line from the request's spooled part and written in CHUNK_BYTES rows
of `file_chunks` inside one transaction: a file refused half-way (a line over the limit, one
line too many) leaves nothing behind, and no process holds more than a chunk of it.
"""

from __future__ import annotations

import json
import re
from typing import BinaryIO

from flask import current_app
from sqlalchemy import insert, select, tuple_

from ..batch_models import ACTIVE_BATCH, CHUNK_BYTES, Batch, FileChunk, StoredFile
from ..errors import ConflictError, NotFoundError, PayloadTooLargeError, ValidationError
from ..extensions import db
from ..models import User

PURPOSES = ("batch",)
LIST_MAX = 10_000
FILENAME_MAX = 255


class FileMissingError(NotFoundError):
    def __init__(self, file_id: str):
        super().__init__(f"No file {file_id!r} is yours: check the id (GET /api/v1/files lists your files).")


def _mib(value: int) -> str:
    return f"{value / (1024 * 1024):g} MiB"


def store_upload(user: User, stream: BinaryIO, filename: str | None, purpose: str | None) -> StoredFile:
    """Check and store an uploaded JSONL file; raise ValidationError (422) or PayloadTooLargeError (413)."""
    if purpose not in PURPOSES:
        raise ValidationError(
            f"purpose must be 'batch' (got {purpose!r}): files here are inputs of batches.",
            {"purpose": "must be 'batch'"},
        )
    name = (filename or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1][:FILENAME_MAX] or "upload.jsonl"
    if "\x00" in name:
        raise ValidationError("The file name must not contain NUL characters.", {"file": "bad file name"})
    stored = StoredFile(user_id=user.id, purpose=purpose, filename=name, kind="upload")
    db.session.add(stored)
    db.session.flush()
    try:
        stored.bytes, stored.lines = _write_chunks(stored.id, stream)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return stored


def _write_chunks(file_id: str, stream: BinaryIO) -> tuple[int, int]:
    """Read `stream` line by line, checking it is JSONL within the limits; return (bytes, lines)."""
    config = current_app.config
    max_bytes, max_lines, line_max = config["FILE_MAX_BYTES"], config["FILE_MAX_LINES"], config["FILE_LINE_MAX_BYTES"]
    size = lines = seq = 0
    number = 0  # physical line number, for messages
    first_seen = False
    buffer = bytearray()
    while True:
        # One byte more than the limit (and its newline) tells a line that is too long.
        line = stream.readline(line_max + 2)
        if not line:
            break
        number += 1
        size += len(line)
        if size > max_bytes:
            raise PayloadTooLargeError(
                f"The file is larger than the {_mib(max_bytes)} limit. Split it into several batches.",
                {"file": f"at most {max_bytes:,} bytes"},
            )
        body = line.rstrip(b"\r\n")
        if len(body) > line_max:
            raise ValidationError(
                f"Line {number} is longer than the {_mib(line_max)} limit for one request.",
                {"file": f"line {number} over {line_max:,} bytes", "line": number},
            )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError(
                f"The file is not JSONL: line {number} is not UTF-8 text.", {"file": "not UTF-8", "line": number}
            ) from None
        if "\x00" in text:
            raise ValidationError(
                f"The file is not JSONL: line {number} contains a NUL byte.", {"file": "NUL byte", "line": number}
            )
        if text.strip():
            lines += 1
            if lines > max_lines:
                raise ValidationError(
                    f"The file has more than {max_lines:,} requests (lines), the most a batch takes. "
                    "Split it into several batches.",
                    {"file": f"at most {max_lines:,} lines"},
                )
            if not first_seen:
                first_seen = True
                _check_first_line(text, number)
        buffer += line
        if len(buffer) >= CHUNK_BYTES:
            db.session.execute(insert(FileChunk), [{"file_id": file_id, "seq": seq, "data": bytes(buffer)}])
            seq += 1
            buffer.clear()
    if lines == 0:
        raise ValidationError("The file is empty: a batch file has one JSON request per line.", {"file": "no lines"})
    if buffer:
        db.session.execute(insert(FileChunk), [{"file_id": file_id, "seq": seq, "data": bytes(buffer)}])
    return size, lines


def _check_first_line(text: str, number: int) -> None:
    """Refuse a file that is not JSONL at all (a CSV, a JSON array); later lines are the batch's to judge."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValidationError(
            f"The file is not JSONL: line {number} is not a JSON object. Each line must be one request, "
            'e.g. {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}.',
            {"file": "not JSONL", "line": number},
        )


def get_file(user: User, file_id: str) -> StoredFile:
    """Return one of the user's files, or raise a 404."""
    stored = db.session.get(StoredFile, file_id) if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", file_id) else None
    if stored is None or stored.user_id != user.id:
        raise FileMissingError(file_id)
    return stored


def list_files(user: User, purpose: str | None, limit: int, after: str | None, order: str) -> tuple[list, bool]:
    """Return the user's files (newest first unless order is asc) after the file `after`, and whether more follow."""
    if not 1 <= limit <= LIST_MAX:
        raise ValidationError(f"limit must be between 1 and {LIST_MAX:,}.", {"limit": f"1 to {LIST_MAX:,}"})
    if order not in ("asc", "desc"):
        raise ValidationError("order must be 'asc' or 'desc'.", {"order": "asc or desc"})
    query = select(StoredFile).where(StoredFile.user_id == user.id)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    key = (StoredFile.created_at, StoredFile.id)
    if after:
        pivot = get_file(user, after)
        if order == "desc":
            query = query.where(tuple_(*key) < tuple_(pivot.created_at, pivot.id))
        else:
            query = query.where(tuple_(*key) > tuple_(pivot.created_at, pivot.id))
    ordering = [column.desc() for column in key] if order == "desc" else list(key)
    rows = list(db.session.scalars(query.order_by(*ordering).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(user: User, file_id: str) -> str:
    """Delete a file and its content; refuse (409) while an unfinished batch reads it."""
    stored = get_file(user, file_id)
    busy = db.session.scalar(
        select(Batch.id).where(Batch.input_file_id == stored.id, Batch.status.in_(ACTIVE_BATCH)).limit(1)
    )
    if busy:
        raise ConflictError(
            f"The file is the input of batch {busy}, which has not finished. "
            "Wait for it to finish, or cancel it, then delete the file.",
            {"batch_id": busy},
        )
    db.session.delete(stored)
    db.session.commit()
    return stored.id
