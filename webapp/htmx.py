"""The htmx details of a request and a response, read and written here and nowhere else.

htmx marks its requests with `HX-Request: true` and says which page they come from in
`HX-Current-URL`; a page that answers htmx differently (a partial instead of a redirect) says
so with `Vary: HX-Request`, and `HX-Redirect` sends the whole tab elsewhere instead of swapping
the answer in. The customer's card names the htmx-flask package for this; its one release
(0.1.0, 2022) does not serve here (docs/architecture.md says why), so these few functions
stand in for it.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from flask import Response, make_response, request


def is_htmx() -> bool:
    """Return whether this request was sent by htmx."""
    return request.headers.get("HX-Request") == "true"


def current_url() -> SplitResult:
    """Return the address of the page htmx sent this request from (all parts empty when not said)."""
    return urlsplit(request.headers.get("HX-Current-URL", ""))


def vary(response: Response) -> Response:
    """Mark a response as one that differs for htmx, so no cache hands one kind to the other."""
    response.vary.add("HX-Request")
    return response


def redirect(location: str, status: int = 401) -> Response:
    """Answer htmx with an empty response that sends the whole tab to `location`.

    A poll whose session ran out must not swap the sign-in page into a task's partial.
    """
    response = make_response("", status)
    response.headers["HX-Redirect"] = location
    return response
