"""Browser protections, in one place: the security headers of every response, and session
cookies that are Secure whenever the request came over HTTPS.

Our pages allow scripts, styles and requests from this site only, with no inline script or
style (`static/app.js` does what script there is; htmx is told to evaluate nothing).

rq-dashboard (at /admin/rq) cannot live under that policy: each of its pages carries an inline
script (with the page's job id or queue name in it), its templates are compiled by underscore
(`new Function`, so 'unsafe-eval') and its markup has style attributes. Its policy is as tight
as it allows: the inline scripts it rendered are allowed by their SHA-256 hashes, computed for
each response, so a script that anything else inserts (job data it puts into the page unescaped,
an `onerror` attribute) does not run; no inline event handlers; requests, forms, frames, fonts
and images to this site only (plus `data:` images, which Bootstrap's CSS uses for icons).
"""

from __future__ import annotations

import base64
import hashlib
import re

from flask import Flask, Response, current_app, has_request_context, request
from flask.sessions import SecureCookieSessionInterface

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
# JSON, Prometheus text, static files: nothing in them may run or load anything, or be framed.
NON_HTML_POLICY = "default-src 'none'; frame-ancestors 'none'"
DASHBOARD_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-eval'{hashes}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)
DASHBOARD_BLUEPRINT = "rq_dashboard"

# An inline <script> element; the browser hashes exactly the text between the tags.
_INLINE_SCRIPT = re.compile(r"<script\b(?P<attrs>[^>]*)>(?P<body>.*?)</script\s*>", re.IGNORECASE | re.DOTALL)
_SCRIPT_TYPE = re.compile(r"""\btype\s*=\s*["']?(?P<type>[^"'\s>]+)""", re.IGNORECASE)
_EXECUTABLE_TYPES = {"", "text/javascript", "application/javascript", "module"}


def inline_script_hashes(html: str) -> list[str]:
    """Return the CSP hash sources of the inline scripts a browser would run in `html`."""
    hashes = []
    for match in _INLINE_SCRIPT.finditer(html):
        attrs = match.group("attrs")
        if re.search(r"\bsrc\s*=", attrs, re.IGNORECASE):
            continue
        kind = _SCRIPT_TYPE.search(attrs)
        if kind and kind.group("type").lower() not in _EXECUTABLE_TYPES:
            continue  # a template (type="text/template"): data, never run
        digest = hashlib.sha256(match.group("body").encode()).digest()
        hashes.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return sorted(set(hashes))


def _dashboard_policy(response: Response) -> str:
    body = "" if response.is_streamed else response.get_data(as_text=True)
    hashes = inline_script_hashes(body)
    return DASHBOARD_POLICY.format(hashes="".join(f" {h}" for h in hashes))


def cookie_secure(app: Flask | None = None) -> bool:
    """Whether cookies set now must be Secure: always with SESSION_COOKIE_SECURE, else over HTTPS."""
    app = app or current_app
    return bool(app.config["SESSION_COOKIE_SECURE"]) or (has_request_context() and request.is_secure)


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, Secure whenever the request came over HTTPS.

    Behind a TLS proxy, `request.is_secure` comes from its X-Forwarded-Proto once TRUSTED_PROXIES
    says to trust it; plain-http `make run` keeps working because its requests are not secure.
    """

    def get_cookie_secure(self, app: Flask) -> bool:
        return cookie_secure(app)


def security_headers(response: Response) -> Response:
    """Add the browser protections to a response (headers a view set itself are kept)."""
    headers = response.headers
    if response.mimetype == "text/html":
        dashboard = request.blueprint == DASHBOARD_BLUEPRINT and response.status_code < 400
        policy = _dashboard_policy(response) if dashboard else CONTENT_SECURITY_POLICY
        headers.setdefault("Content-Security-Policy", policy)
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    else:
        headers.setdefault("Content-Security-Policy", NON_HTML_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    hsts = current_app.config["HSTS_SECONDS"]
    if hsts and request.is_secure:
        headers.setdefault("Strict-Transport-Security", f"max-age={hsts}")
    return response


def init_app(app: Flask) -> None:
    app.session_interface = SessionInterface()
    app.after_request(security_headers)
