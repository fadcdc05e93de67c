"""What the pages' action buttons share: a refused action is a flash message, not an error page.

An action form (Cancel, Send a test event, Resend, …) posts, the view calls one service
function and flashes how it went, then redirects (303) to the page the button was on. When the
service refuses (a domain error: already finished, disabled, busy), the next page shows that
error's own message instead:

    with flash_refused(ConflictError):
        service.cancel_batch(current_user, batch_id)
        flash("Batch cancelled.", "info")
    return redirect(...)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import flash

from ..errors import AppError


@contextmanager
def flash_refused(*refused: type[AppError]) -> Iterator[None]:
    """Flash the message of an error in `refused` raised in the block, and go on after it.

    Other errors pass on to the error handlers (a record that is not yours is the 404 page).
    """
    try:
        yield
    except refused as exc:
        flash(exc.message, "error")
