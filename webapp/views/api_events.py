"""JSON API v1: a task's event stream (GET /api/v1/tasks/<id>/events), on the API's blueprint.

Importing this module adds the route to `views.api.bp`. How the stream is fed and what it
sends: `webapp/streams.py`.
"""

from __future__ import annotations

from flask import Response, current_app, g, request
from werkzeug.exceptions import NotAcceptable

from .. import streams
from ..errors import AppError
from ..models import Task
from ..schemas import ErrorEnvelope, TaskPath
from ..services import tasks as service
from .api import BEARER, COMMON, bp, tasks_tag

MEDIA_TYPE = "text/event-stream"


class StreamsFullError(AppError):
    """The process holds STREAMS_PER_PROCESS streams: one more would take a page's thread."""

    status = 503
    code = "unavailable"
    retry_after = 5


@bp.get(
    "/tasks/<int:task_id>/events",
    tags=[tasks_tag],
    summary="Follow a task as Server-Sent Events",
    description=(
        "`event: text` (`id:` the characters of the answer sent so far, `data: {delta, progress}`) and "
        "`event: status` (`data:` the task) on every change of status; the stream ends after a finished "
        "status. Send `Last-Event-ID` to resume: nothing is repeated or missed. A keep-alive comment "
        "comes every 15 s."
    ),
    security=BEARER,
    responses={200: None, 404: ErrorEnvelope, 406: ErrorEnvelope, **COMMON},
)
def task_events(path: TaskPath):
    task = service.get_task(g.user, path.task_id)
    accept = request.accept_mimetypes
    if accept and accept.best_match([MEDIA_TYPE]) is None:
        raise NotAcceptable(f"This is an event stream: send 'Accept: {MEDIA_TYPE}' (or no Accept header).")
    row = {column.name: getattr(task, column.key) for column in Task.__table__.columns}
    owner = streams.watcher(current_app._get_current_object())
    if not owner.open():
        raise StreamsFullError(
            f"This server holds {owner.cap} event streams already. Try again in a few seconds, "
            "or poll GET /api/v1/tasks/<id>.",
            {"streams": owner.cap},
        )
    sub = owner.subscribe(task.id, row)
    offset = streams.parse_offset(request.headers.get("Last-Event-ID"))
    keepalive = float(current_app.config["STREAM_KEEPALIVE_SECONDS"])
    response = Response(streams.events(sub, offset, keepalive), mimetype=MEDIA_TYPE)
    response.call_on_close(lambda: owner.release(sub))
    # Proxies must pass each event on as it comes, and keep none.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"
    return response
