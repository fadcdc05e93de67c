"""The content of files: an upload's chunks, and a batch's output and error files made from its tasks.

An upload is read back a chunk (CHUNK_BYTES) per query. A batch's output and error files are
made from its task rows as they are read (never whole in memory).

Rows are read a thousand at a time by keyset (each page a short query of its own, so a slow
download holds no transaction), in line order: the tasks were inserted in the file's order.
Output lines are OpenAI's: `{"id": "batch_req_…", "custom_id", "response": {"status_code": 200,
"request_id", "body": <a chat.completion with usage>}, "error": null}`; error lines carry
`"response": null` and `"error": {"code", "message"}`.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
from collections.abc import Iterator

from sqlalchemy import select

from .batch_models import BatchLineError, FileChunk, epoch
from .catalog import catalog
from .extensions import db
from .models import Task, TaskStatus

PAGE = 1000
_tasks = Task.__table__
_COLUMNS = (
    _tasks.c.id,
    _tasks.c.custom_id,
    _tasks.c.batch_line,
    _tasks.c.model,
    _tasks.c.served_by,
    _tasks.c.params,
    _tasks.c.prompt,
    _tasks.c.result,
    _tasks.c.error,
    _tasks.c.error_kind,
    _tasks.c.status,
    _tasks.c.prompt_tokens,
    _tasks.c.completion_tokens,
    _tasks.c.finish_reason,
    _tasks.c.finished_at,
)


def _pages(statement, id_column) -> Iterator:
    """Yield the rows of `statement` in `id_column` order, PAGE at a time by keyset, each page a
    short query on a connection of its own."""
    after = 0
    while True:
        with db.engine.connect() as connection:
            rows = connection.execute(statement.where(id_column > after).order_by(id_column).limit(PAGE)).all()
        yield from rows
        if len(rows) < PAGE:
            return
        after = rows[-1].id


def _task_rows(batch_id: str, statuses: tuple[str, ...]) -> Iterator:
    statement = select(*_COLUMNS).where(_tasks.c.batch_id == batch_id, _tasks.c.status.in_(statuses))
    return _pages(statement, _tasks.c.id)


def _line_errors(batch_id: str) -> Iterator:
    table = BatchLineError.__table__
    statement = select(table.c.id, table.c.line, table.c.custom_id, table.c.code, table.c.message).where(
        table.c.batch_id == batch_id
    )
    return _pages(statement, table.c.id)


def finish_reason(row) -> str:
    """Return why the answer ended: as the provider said, or else judged from its length."""
    if row.finish_reason:
        return row.finish_reason
    spec = catalog().get(row.model)
    cap = (row.params or {}).get("max_tokens") or (spec.default_max_tokens if spec else None)
    return "length" if cap and (row.completion_tokens or 0) >= cap else "stop"


def completion(row) -> dict:
    """Return a finished task as the chat.completion object the provider's API would have sent."""
    prompt_tokens, completion_tokens = row.prompt_tokens or 0, row.completion_tokens or 0
    return {
        "id": f"chatcmpl-{row.id}",
        "object": "chat.completion",
        "created": epoch(row.finished_at),
        "model": row.served_by or row.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": row.result or "", "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(row),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _json_line(value: dict) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def output_lines(batch_id: str) -> Iterator[bytes]:
    for row in _task_rows(batch_id, (TaskStatus.COMPLETED.value,)):
        response = {"status_code": 200, "request_id": f"req_{row.id}", "body": completion(row)}
        yield _json_line({"id": f"batch_req_{row.id}", "custom_id": row.custom_id, "response": response, "error": None})


def _error_code(row) -> str:
    if row.status == TaskStatus.CANCELLED.value:
        return "batch_expired" if row.error_kind == "batch_expired" else "batch_cancelled"
    return row.error_kind or "failed"


def errors(batch_id: str) -> Iterator[tuple[int, str, str, str, int | None]]:
    """Yield (line, custom_id, code, message, task id or None) of every failed line, in line order."""
    failed = (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)
    tasks = (
        (row.batch_line or 0, row.custom_id, _error_code(row), row.error or "The request failed.", row.id)
        for row in _task_rows(batch_id, failed)
    )
    lines = ((row.line, row.custom_id, row.code, row.message, None) for row in _line_errors(batch_id))
    return heapq.merge(lines, tasks, key=lambda item: item[0])


def error_lines(batch_id: str) -> Iterator[bytes]:
    for line, custom_id, code, message, task_id in errors(batch_id):
        request_id = f"batch_req_{task_id}" if task_id else f"batch_req_line_{line}"
        yield _json_line(
            {"id": request_id, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
        )


def _csv_rows(rows: Iterator[list]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(row)
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()


def output_csv(batch_id: str) -> Iterator[bytes]:
    header = [["custom_id", "prompt", "answer", "model", "prompt_tokens", "completion_tokens", "finish_reason"]]
    rows = (
        [
            row.custom_id,
            row.prompt,
            row.result or "",
            row.served_by or row.model,
            row.prompt_tokens,
            row.completion_tokens,
            finish_reason(row),
        ]
        for row in _task_rows(batch_id, (TaskStatus.COMPLETED.value,))
    )
    yield from _csv_rows(iter(header + []))
    yield from _csv_rows(rows)


def errors_csv(batch_id: str) -> Iterator[bytes]:
    yield from _csv_rows(iter([["line", "custom_id", "code", "message"]]))
    yield from _csv_rows([line, custom_id, code, message] for line, custom_id, code, message, _ in errors(batch_id))


def content(batch_id: str, kind: str) -> Iterator[bytes]:
    """Return the JSONL content of a batch's output or error file."""
    return output_lines(batch_id) if kind == "output" else error_lines(batch_id)


def stored_chunks(file_id: str) -> Iterator[bytes]:
    """Yield an upload's content chunk by chunk, each read in a short query of its own."""
    seq = 0
    while True:
        with db.engine.connect() as connection:
            data = connection.scalar(select(FileChunk.data).where(FileChunk.file_id == file_id, FileChunk.seq == seq))
        if data is None:
            return
        yield bytes(data)
        seq += 1


def stored_lines(file_id: str) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, line without its newline) of an upload, blank lines included."""
    rest = b""
    number = 0
    for chunk in stored_chunks(file_id):
        data = rest + chunk
        parts = data.split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            yield number, part.rstrip(b"\r")
    if rest:
        yield number + 1, rest.rstrip(b"\r")
