"""Refuse deeply nested JSON under /api/ before anything parses it.

Python's json parser recurses once per level: a body of 100,000 `[` ends in RecursionError,
a 500, and a few thousand levels already cost a deep stack per request. No request of this API
needs more than a handful, so a body nested deeper than JSON_MAX_DEPTH is a 422. The depth is
measured with regular expressions that never recurse: strings are cut out (brackets inside
them do not count), then innermost pairs are removed pass by pass, at most JSON_MAX_DEPTH + 1
passes over a body that MAX_CONTENT_LENGTH already bounds.
"""

from __future__ import annotations

import re

from flask import Flask, current_app, request

from .config import UPLOAD_ENDPOINTS
from .errors import ValidationError

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_INNERMOST = re.compile(rb"\[\]|\{\}")
_OPENERS = re.compile(rb"[\[{]+")


def json_depth(data: bytes, limit: int) -> int:
    """Return how deeply `data` nests arrays and objects, or limit + 1 once it is known to exceed it.

    Malformed JSON is measured too: what is left unclosed adds its longest run of openers (a
    parser descends that far before it meets the end), so `[` a million times is refused here
    rather than by a RecursionError; a mere mismatch stays shallow, for the parser to refuse.
    """
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    depth = 0
    while brackets and depth <= limit:
        inner = _INNERMOST.sub(b"", brackets)
        if inner == brackets:
            return depth + max(map(len, _OPENERS.findall(brackets)), default=0)
        brackets = inner
        depth += 1
    return depth


def refuse_deep_json() -> None:
    """Refuse (422) an API request whose JSON body nests deeper than JSON_MAX_DEPTH."""
    if not request.path.startswith("/api/") or not request.is_json or request.endpoint in UPLOAD_ENDPOINTS:
        return  # (an upload's body is a file, never parsed as JSON)
    limit = current_app.config["JSON_MAX_DEPTH"]
    # Bounded: werkzeug reads at most MAX_CONTENT_LENGTH (the API refuses larger bodies with 413).
    if json_depth(request.get_data(cache=True), limit) > limit:
        raise ValidationError(
            f"The JSON body nests arrays or objects more than {limit} levels deep; no request of this API "
            "needs that many. Send a flatter body.",
            {"body": f"at most {limit} levels"},
        )


def init_app(app: Flask) -> None:
    app.before_request(refuse_deep_json)
