"""Model output as HTML: Markdown with raw HTML off, then cleaned with nh3 (a whitelist sanitiser).

Model answers are untrusted: a prompt can ask the model to write anything, including markup.
Two layers keep it inert. markdown-it never passes HTML through (`html: False` escapes it) and
refuses `javascript:`/`vbscript:`/`file:`/`data:` links; nh3 then keeps only the tags and
attributes below, whatever the parser produced. Images are not rendered at all, so an answer
cannot make the reader's browser fetch a URL (a tracking pixel that leaks the page's content).

Links into this site's admin area (`/admin/...`, however spelled: relative, `..`, percent-
encoded, a backslash, or absolute to this host) are not links at all: their text stays, the
address follows it as code, and nothing is clickable. An answer is text someone else could
have steered; it must not be a handy way to get an admin to open an admin page of an
attacker's choosing (a pre-filled bulk action, a crafted rq-dashboard address).
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote, urljoin, urlsplit

import nh3
from flask import has_request_context, request
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markupsafe import Markup

from . import htmx

TAGS = {
    "p", "br", "hr", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre", "blockquote",
    "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
CLASSES = {"span": {"unlinked"}}
URL_SCHEMES = {"http", "https", "mailto"}
ADMIN_AREA = "/admin"


def _shift_headings(state: StateCore) -> None:
    """Render `#` as h3 and so on: the page already has its h1 and h2."""
    for token in state.tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 2)}"


def _bases() -> list[str]:
    """The paths a relative link may be resolved against: the site's root, this request's path,
    and the page an htmx partial is swapped into (a browser resolves against that page)."""
    if not has_request_context():
        return ["/"]
    page = htmx.current_url().path
    return ["/", request.path] + ([page] if page else [])


def points_into_admin(href: str) -> bool:
    """Whether a link, followed from a page showing it, could open a page of this site's admin area."""
    raw = href
    for _ in range(3):  # "%2561" is "%61" is "a": decode until it stops changing
        raw, before = unquote(raw), raw
        if raw == before:
            break
    # Browsers read a backslash as "/" and drop tabs and newlines from addresses.
    raw = "".join(c for c in raw.replace("\\", "/") if c not in "\t\n\r").strip()
    parts = urlsplit(raw)
    if parts.scheme and parts.scheme.lower() not in ("http", "https"):
        return False
    bases = _bases()
    if parts.netloc:
        ours = urlsplit("//" + request.host).hostname if has_request_context() else None
        if (parts.hostname or "") != ours:
            return False
        bases = ["/"]
    prefix = ((request.script_root if has_request_context() else "") + ADMIN_AREA).lower()
    for base in bases:
        path = "/" + posixpath.normpath(urljoin(base, parts.path or base)).lower().lstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def _unlink_admin_links(state: StateCore) -> None:
    """Turn links into the admin area into text followed by their address."""
    for block in state.tokens:
        if block.type != "inline" or not block.children:
            continue
        children: list[Token] = []
        opened: list[str | None] = []  # per open link: the address to show after it, or None
        for token in block.children:
            if token.type == "link_open":
                href = str(token.attrGet("href") or "")
                if points_into_admin(href):
                    token.tag, token.attrs = "span", {"class": "unlinked"}
                    opened.append(href)
                else:
                    opened.append(None)
            children.append(token)
            if token.type == "link_close" and opened:
                href = opened.pop()
                if href is not None:
                    token.tag = "span"
                    note = Token("text", "", 0, content=" (not a link: ")
                    code = Token("code_inline", "code", 0, content=href, markup="`")
                    children += [note, code, Token("text", "", 0, content=")")]
        block.children = children


def _parser() -> MarkdownIt:
    # `breaks`: a single newline is a line break, as people (and models) mean it: a haiku keeps its lines.
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    # `![alt](url)` stays text: no image is ever fetched because a model wrote its address.
    md.disable("image")
    md.core.ruler.push("shift_headings", _shift_headings)
    md.core.ruler.push("unlink_admin_links", _unlink_admin_links)
    return md


_md = _parser()


def clean_html(html: str) -> str:
    """Keep only the whitelisted tags, attributes and link schemes; links get rel=noopener etc."""
    return nh3.clean(
        html,
        tags=TAGS,
        attributes=ATTRIBUTES,
        allowed_classes=CLASSES,
        url_schemes=URL_SCHEMES,
        link_rel="nofollow noopener noreferrer",
        strip_comments=True,
    )


def render_markdown(text: str | None) -> Markup:
    """Return untrusted Markdown as safe HTML."""
    if not text:
        return Markup("")
    return Markup(clean_html(_md.render(text)))
