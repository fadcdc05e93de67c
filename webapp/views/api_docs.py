"""Interactive API docs at /api/v1/docs: Swagger UI, from the PyPI package flask-openapi3-swagger
(flask-openapi3's Swagger UI plugin, pinned in requirements.txt), every file served from this site.

The plugin's own page starts Swagger UI with an inline script, which the site's
Content-Security-Policy refuses; this page loads the plugin's files and starts Swagger UI from
static/api-docs.js instead, so scripts and styles come from this site only, as on every page.
The one difference: Swagger UI's stylesheet draws its icons as `data:` SVG images, which
`img-src` here allows (an image runs no script). The page is public, as the OpenAPI document
is; "Authorize" takes an API token (from the Tokens page), kept in the page only.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from flask import Blueprint, make_response, render_template

from ..security import CONTENT_SECURITY_POLICY

DOCS_POLICY = CONTENT_SECURITY_POLICY.replace("img-src 'self';", "img-src 'self' data:;")


def _swagger_files() -> str:
    """The folder of Swagger UI's files inside the installed plugin (js/, css/, images/)."""
    spec = find_spec("flask_openapi3_swagger")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "flask-openapi3-swagger is not installed: `pip install -r requirements.txt` (it serves /api/v1/docs)"
        )
    return str(Path(spec.origin).parent / "templates" / "swagger")


bp = Blueprint("api_docs", __name__, url_prefix="/api/v1/docs", static_folder=_swagger_files(), static_url_path="/ui")


@bp.get("")
def docs():
    response = make_response(render_template("api_docs.html"))
    response.headers["Content-Security-Policy"] = DOCS_POLICY
    return response
