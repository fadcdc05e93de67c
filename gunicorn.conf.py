"""gunicorn settings shared by `make run` and the Docker image (gunicorn reads ./gunicorn.conf.py).

The access log names the path without its query string, and no referrer: query strings hold
what users typed (History's prompt search) and, from a misbehaving client, perhaps an API token
(the API refuses tokens in URLs, but the request line would still be logged). What remains is
enough to follow traffic: client, time, method, path, status, size, duration, user agent.

gunicorn answers requests it cannot parse (a request line or headers over its limits, garbage)
itself, before the app sees them. Its page quotes the limit and the offending text and carries
none of the app's headers; `write_error` below replaces it (gunicorn has no setting for that):
a fixed sentence per status, as plain text, with the headers every answer of the app has.
"""

import gunicorn.util

access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'

ERROR_TEXT = {
    400: "The request could not be read.",
    403: "The request was refused.",
    414: "The address is too long.",
    417: "The expectation cannot be met.",
    431: "The request's headers are too large.",
    500: "Something went wrong on our side.",
    501: "That transfer coding is not supported.",
}
# The same as webapp/security.py gives JSON and text answers (gunicorn runs before the app).
ERROR_HEADERS = (
    "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: same-origin\r\n"
    "Cache-Control: no-store\r\n"
)


def write_error(sock, status_int, reason, mesg):
    """Answer a request gunicorn refused: its status, one sentence, our headers; nothing of the request."""
    body = (ERROR_TEXT.get(status_int, "The request could not be handled.") + "\n").encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{ERROR_HEADERS}\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = write_error
