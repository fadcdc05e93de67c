"""The Batches pages: upload a JSONL or CSV file, follow each batch live, read its errors, download results.

The same services as the API (`services/files`, `services/batches`); a CSV upload is turned into
JSONL lines first (`services/batch_csv`) and its results can be downloaded as CSV too.
"""

from __future__ import annotations

from flask import Blueprint, Response, flash, redirect, render_template, request, stream_with_context, url_for
from flask_login import current_user, login_required

from .. import batch_content
from ..batch_models import BatchStatus
from ..catalog import catalog
from ..errors import AppError, ConflictError, ValidationError
from ..extensions import db
from ..services import batch_csv, files
from ..services import batches as service
from .forms import flash_refused

bp = Blueprint("batches", __name__)
ERRORS_SHOWN = 100
DOWNLOADS = {
    "output.jsonl": (batch_content.output_lines, "application/jsonl"),
    "errors.jsonl": (batch_content.error_lines, "application/jsonl"),
    "output.csv": (batch_content.output_csv, "text/csv"),
    "errors.csv": (batch_content.errors_csv, "text/csv"),
}


@bp.after_request
def no_store(response):
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _render_list(error: str | None = None, model: str | None = None):
    rows, more = service.list_batches(current_user, limit=50)
    return render_template(
        "batches.html",
        batches=[(batch, service.request_counts(batch)) for batch in rows],
        more=more,
        error=error,
        models=sorted(catalog().names()),
        selected=model or catalog().default,
    )


@bp.get("/batches")
@login_required
def index():
    return _render_list()


@bp.post("/batches")
@login_required
def upload():
    """Store the uploaded file (CSV converted to JSONL lines) and create its batch."""
    upload = request.files.get("file")
    model = request.form.get("model") or None
    if upload is None or not upload.filename:
        return _render_list("Choose a JSONL or CSV file to upload.", model)
    if model is not None and catalog().get(model) is None:
        return _render_list("Choose a model from the list.", None)
    csv = batch_csv.is_csv(upload.filename, upload.mimetype)
    try:
        stream = batch_csv.to_jsonl(upload.stream) if csv else upload.stream
        stored = files.store_upload(current_user, stream, upload.filename, "batch")
        batch = service.create_batch(
            current_user,
            stored.id,
            "/v1/chat/completions",
            "24h",
            input_format="csv" if csv else "jsonl",
            model=model,
        )
    except AppError as exc:
        db.session.rollback()
        # 200, not 4xx: the form is the answer (htmx and plain forms alike show it).
        return _render_list(exc.message, model)
    return redirect(url_for("batches.detail", batch_id=batch.id), 303)


def _errors(batch) -> list:
    """The first ERRORS_SHOWN failed lines of a running or ended batch: (line, custom_id, code, message)."""
    if batch.status in (BatchStatus.VALIDATING.value, BatchStatus.FAILED.value):
        return []
    found = []
    for line, custom_id, code, message, _task_id in batch_content.errors(batch.id):
        found.append((line, custom_id, code, message))
        if len(found) >= ERRORS_SHOWN:
            break
    return found


@bp.get("/batches/<batch:batch_id>")
@login_required
def detail(batch_id: str):
    batch = service.get_batch(current_user, batch_id)
    counts = service.batch_view(batch)["request_counts"]
    return render_template("batch.html", batch=batch, counts=counts, errors=_errors(batch), shown=ERRORS_SHOWN)


@bp.get("/batches/<batch:batch_id>/live")
@login_required
def live(batch_id: str):
    """The batch's status and counts; polls itself while the batch is not over."""
    batch = service.get_batch(current_user, batch_id)
    counts = service.batch_view(batch)["request_counts"]
    if request.args.get("row"):
        return render_template("_batch_row.html", batch=batch, counts=counts)
    return render_template("_batch.html", batch=batch, counts=counts, errors=_errors(batch), shown=ERRORS_SHOWN)


@bp.post("/batches/<batch:batch_id>/cancel")
@login_required
def cancel(batch_id: str):
    with flash_refused(ConflictError):
        service.cancel_batch(current_user, batch_id)
        flash("Batch cancelled: its unfinished lines will not run.", "info")
    return redirect(url_for("batches.detail", batch_id=batch_id), 303)


@bp.get("/batches/<batch:batch_id>/<any('output.jsonl', 'errors.jsonl', 'output.csv', 'errors.csv'):name>")
@login_required
def download(batch_id: str, name: str):
    batch = service.get_batch(current_user, batch_id)
    if name.endswith(".csv") and batch.input_format != "csv":
        raise ValidationError("CSV downloads are for batches uploaded as CSV; download the JSONL.")
    lines, mimetype = DOWNLOADS[name]
    headers = {"Content-Disposition": f'attachment; filename="{batch.id}_{name}"'}
    return Response(stream_with_context(lines(batch.id)), mimetype=mimetype, headers=headers)
