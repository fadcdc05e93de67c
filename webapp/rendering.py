"""Model output as HTML: Markdown with raw HTML off, then cleaned with nh3 (a whitelist sanitiser).

Model answers are untrusted: a prompt can ask the model to write anything, including markup.
Two layers keep it inert. markdown-it never passes HTML through (`html: False` escapes it) and
refuses `javascript:`/`vbscript:`/`file:`/`data:` links; nh3 then keeps only the tags and
attributes below, whatever the parser produced. Images are not rendered at all, so an answer
cannot make the reader's browser fetch a URL (a tracking pixel that leaks the page's content).
"""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markupsafe import Markup

TAGS = {
    "p", "br", "hr", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre", "blockquote",
    "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}


def _shift_headings(state: StateCore) -> None:
    """Render `#` as h3 and so on: the page already has its h1 and h2."""
    for token in state.tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 2)}"


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    # `![alt](url)` stays text: no image is ever fetched because a model wrote its address.
    md.disable("image")
    md.core.ruler.push("shift_headings", _shift_headings)
    return md


_md = _parser()


def clean_html(html: str) -> str:
    """Keep only the whitelisted tags, attributes and link schemes; links get rel=noopener etc."""
    return nh3.clean(
        html,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="nofollow noopener noreferrer",
        strip_comments=True,
    )


def render_markdown(text: str | None) -> Markup:
    """Return untrusted Markdown as safe HTML."""
    if not text:
        return Markup("")
    return Markup(clean_html(_md.render(text)))
