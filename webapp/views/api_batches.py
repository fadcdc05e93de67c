"""JSON API v1: OpenAI's Files and Batch APIs (/api/v1/files, /api/v1/batches), on the API's blueprint.

The official `openai` SDK works unchanged with `base_url=<host>/api/v1` and one of our API
tokens: the objects are OpenAI's, field for field (docs/batches.md).
"""

from __future__ import annotations

from typing import Any, Literal

from flask import Response, g, stream_with_context
from flask_openapi3 import FileStorage, Tag
from pydantic import BaseModel, ConfigDict, Field

from .. import batch_content
from ..schemas import ErrorEnvelope
from ..services import batches as service
from ..services import files
from .api import BEARER, BODY_ERRORS, COMMON, bp

files_tag = Tag(name="files", description="Upload batch input files (JSONL); read a batch's output and error files")
batches_tag = Tag(name="batches", description="Run a file of chat-completion requests: OpenAI's Batch API")
IDS = r"^[A-Za-z0-9_-]{1,64}$"
JSONL = "application/jsonl"


class FileUpload(BaseModel):
    # The SDK may send fields of its own (expires_after): they are ignored.
    model_config = ConfigDict(extra="ignore")

    file: FileStorage = Field(description="JSONL: one request per line, at most 50,000 lines and 200 MiB.")
    purpose: str = Field(max_length=64, description="Must be 'batch'.")


class FileOut(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: str
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class FileQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    purpose: str | None = Field(None, max_length=64)
    limit: int = Field(10_000, ge=1, le=10_000)
    after: str | None = Field(None, pattern=IDS)
    order: Literal["asc", "desc"] = "desc"


class FilePath(BaseModel):
    file_id: str = Field(pattern=IDS)


class BatchCreate(BaseModel):
    # Values are checked by the service, which says which rule a value broke.
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64, description="A file you uploaded with purpose 'batch'.")
    endpoint: str = Field(max_length=200, description="Must be /v1/chat/completions.")
    completion_window: str = Field(max_length=20, description="Must be 24h.")
    metadata: dict[str, Any] | None = Field(
        None, description="Up to 16 keys of at most 64 characters, values strings of at most 512."
    )


class BatchError(BaseModel):
    code: str | None
    message: str | None
    line: int | None
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchOut(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=100)
    after: str | None = Field(None, pattern=IDS, description="The id of the last batch of the previous page.")


class BatchPath(BaseModel):
    batch_id: str = Field(pattern=IDS)


def _page(items: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


@bp.post(
    "/files",
    tags=[files_tag],
    summary="Upload a batch input file (multipart: file, purpose=batch)",
    security=BEARER,
    responses={200: FileOut, **BODY_ERRORS, **COMMON},
)
def create_file(form: FileUpload):
    """Store the file in PostgreSQL while reading it; a file over a limit is refused whole."""
    stored = files.store_upload(g.user, form.file.stream, form.file.filename, form.purpose)
    return stored.to_dict()


@bp.get(
    "/files",
    tags=[files_tag],
    summary="Your files, newest first (after: the id of the last file of the previous page)",
    security=BEARER,
    responses={200: FileList, 404: ErrorEnvelope, **COMMON},
)
def list_files(query: FileQuery):
    rows, more = files.list_files(g.user, query.purpose, query.limit, query.after, query.order)
    return _page([row.to_dict() for row in rows], more)


@bp.get(
    "/files/<file_id>",
    tags=[files_tag],
    summary="One file",
    security=BEARER,
    responses={200: FileOut, 404: ErrorEnvelope, **COMMON},
)
def get_file(path: FilePath):
    return files.get_file(g.user, path.file_id).to_dict()


@bp.get(
    "/files/<file_id>/content",
    tags=[files_tag],
    summary="A file's content (JSONL), streamed",
    security=BEARER,
    responses={200: None, 404: ErrorEnvelope, **COMMON},
)
def file_content(path: FilePath):
    stored = files.get_file(g.user, path.file_id)
    if stored.kind == "upload":
        chunks = batch_content.stored_chunks(stored.id)
    else:
        chunks = batch_content.content(stored.batch_id, stored.kind)
    headers = {"Content-Disposition": f'attachment; filename="{stored.filename}"'}
    return Response(stream_with_context(chunks), mimetype=JSONL, headers=headers)


@bp.delete(
    "/files/<file_id>",
    tags=[files_tag],
    summary="Delete a file (not the input of an unfinished batch)",
    security=BEARER,
    responses={200: FileDeleted, 404: ErrorEnvelope, 409: ErrorEnvelope, **COMMON},
)
def delete_file(path: FilePath):
    return {"id": files.delete_file(g.user, path.file_id), "object": "file", "deleted": True}


@bp.post(
    "/batches",
    tags=[batches_tag],
    summary="Create a batch from an uploaded file",
    security=BEARER,
    responses={200: BatchOut, 404: ErrorEnvelope, **BODY_ERRORS, **COMMON},
)
def create_batch(body: BatchCreate):
    """Record the batch as validating; its file is read and its lines queued in the background."""
    batch = service.create_batch(g.user, body.input_file_id, body.endpoint, body.completion_window, body.metadata)
    return service.batch_view(batch)


@bp.get(
    "/batches",
    tags=[batches_tag],
    summary="Your batches, newest first",
    security=BEARER,
    responses={200: BatchList, 404: ErrorEnvelope, **COMMON},
)
def list_batches(query: BatchQuery):
    rows, more = service.list_batches(g.user, query.limit, query.after)
    return _page([service.batch_view(row) for row in rows], more)


@bp.get(
    "/batches/<batch_id>",
    tags=[batches_tag],
    summary="One batch, with its request counts",
    security=BEARER,
    responses={200: BatchOut, 404: ErrorEnvelope, **COMMON},
)
def get_batch(path: BatchPath):
    return service.batch_view(service.get_batch(g.user, path.batch_id))


@bp.post(
    "/batches/<batch_id>/cancel",
    tags=[batches_tag],
    summary="Cancel a batch: its unfinished lines stop",
    security=BEARER,
    responses={200: BatchOut, 404: ErrorEnvelope, 409: ErrorEnvelope, **COMMON},
)
def cancel_batch(path: BatchPath):
    return service.batch_view(service.cancel_batch(g.user, path.batch_id))
