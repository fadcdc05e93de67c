"""URL converters: an id in a page's path is a row id, or the route does not match (404)."""

from __future__ import annotations

from werkzeug.routing import BaseConverter, IntegerConverter

from .models import MAX_ID


class IdConverter(IntegerConverter):
    """`<id:name>`: 1 to 2^63-1 in plain ASCII digits; anything else (too big, zero, negative, not
    a number) does not match, so the caller gets the ordinary 404 page."""

    # werkzeug's `int` matches any Unicode digit (\d), so /tasks/٣ would be task 3.
    regex = r"[0-9]+"

    def __init__(self, map, *args, **kwargs):
        super().__init__(map, min=1, max=MAX_ID)


class BatchIdConverter(BaseConverter):
    """`<batch:name>`: a batch id as this app makes them (batch_ and 24 hex digits), else a 404."""

    regex = r"batch_[0-9a-f]{24}"


def init_app(app) -> None:
    app.url_map.converters["id"] = IdConverter
    app.url_map.converters["batch"] = BatchIdConverter
