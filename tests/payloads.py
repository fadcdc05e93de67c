"""Hostile text for prompts and model answers, and a check that a page rendered it inert.

Each payload would do something if it reached the page as markup: run script (a dialog), fetch
or navigate to another origin, fire an htmx request, sign the reader out, or show a template's
evaluation. Their markers ("xss-…", "evil.invalid", "/xss-…") make any effect easy to spot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from html.parser import HTMLParser

PAYLOADS = [
    # Markup and script
    '<script>alert("xss-script")</script>',
    '<img src="/xss-img" onerror=alert("xss-img")>',
    "<svg onload=alert('xss-svg')><circle r=1></circle></svg>",
    "<iframe src=\"javascript:alert('xss-iframe')\"></iframe>",
    "<a href=\"javascript:alert('xss-link')\">link</a>",
    '<details open ontoggle=alert("xss-toggle")>d</details>',
    '<body onload=alert("xss-body")>',
    '"><script>alert("xss-attr")</script>',
    "'><img src=/xss-attr2 onerror=alert('xss-attr2')>",
    '</textarea><script>alert("xss-textarea")</script>',
    '</title><script>alert("xss-title")</script>',
    '<!--<script>alert("xss-comment")</script>-->',
    "<noscript><p title=\"</noscript><img src=/xss-mxss onerror=alert('xss-mxss')>\">",
    '<math><mtext><table><mglyph><style><img src=/xss-math onerror=alert("xss-math")>',
    # Requests to another origin, navigation, page takeover
    '<meta http-equiv="refresh" content="0;url=https://evil.invalid/xss-refresh">',
    '<link rel="stylesheet" href="https://evil.invalid/xss.css">',
    "<style>@import 'https://evil.invalid/xss-import.css'; body{background:url(https://evil.invalid/xss-bg)}</style>",
    '<base href="https://evil.invalid/">',
    '<form action="https://evil.invalid/xss-form"><button>go</button></form>',
    '<object data="https://evil.invalid/xss-object"></object><embed src="https://evil.invalid/xss-embed">',
    # htmx attributes: requests the app did not render
    '<div hx-get="/xss-htmx-get" hx-trigger="load">h</div>',
    '<button hx-post="/logout" hx-trigger="load">sign out</button>',
    '<div data-hx-get="/xss-data-hx" data-hx-trigger="load" hx-on:htmx:load="alert(\'xss-hx-on\')"></div>',
    '<a hx-get="https://evil.invalid/xss-htmx-offsite" hx-trigger="load" hx-target="body">x</a>',
    '<div hx-vals=\'js:{a: alert("xss-hx-vals")}\' hx-get="/tasks" hx-trigger="load"></div>',
    # Template syntax (Jinja, others)
    "{{ 7*7 }} {{ config.SECRET_KEY }} {% for x in range(3) %}xss-loop{% endfor %} ${7*7} #{7*7} <%= 7*7 %>",
    # Markdown link tricks
    '[md](javascript:alert("xss-md-js"))',
    '[md](JaVaScRiPt:alert("xss-md-case"))',
    '[md](  javascript:alert("xss-md-space"))',
    '[md](java&#x09;script:alert("xss-md-entity"))',
    '[md](&#106;avascript:alert("xss-md-entity2"))',
    "[md](data:text/html;base64,PHNjcmlwdD5hbGVydCgneHNzLWRhdGEnKTwvc2NyaXB0Pg==)",
    '[md](vbscript:msgbox("xss-md-vb"))',
    '<javascript:alert("xss-md-autolink")>',
    '[ref][x]\n\n[x]: javascript:alert("xss-md-ref")',
    "![pixel](https://evil.invalid/xss-pixel.png) ![img](x\" onerror=\"alert('xss-md-img'))",
    '[title](https://example.com "t\\" onmouseover=\\"alert(\'xss-md-title\')")',
    "[![nested](https://evil.invalid/xss-nested.png)](javascript:alert('xss-md-nested'))",
    '```html\n<script>alert("xss-fence")</script>\n```',
    # Unicode tricks
    '\u202e<script>alert("xss-rtl")</script>\u202c',
    "\u200b<scr\u200bipt>alert('xss-zw')</scr\u200bipt>",
]

# URL schemes that run or embed instead of navigating.
_BAD_SCHEMES = ("javascript:", "data:", "vbscript:")
# What the Markdown renderer may legitimately add to a page (webapp/rendering.py's whitelist).
MARKDOWN_ELEMENTS = {
    ("p", ()), ("br", ()), ("hr", ()), ("h3", ()), ("h4", ()), ("h5", ()), ("h6", ()), ("strong", ()), ("em", ()),
    ("del", ()), ("s", ()), ("code", ()), ("pre", ()), ("blockquote", ()), ("ul", ()), ("ol", ()), ("ol", ("start",)),
    ("li", ()), ("table", ()), ("thead", ()), ("tbody", ()), ("tr", ()), ("th", ()), ("td", ()),
    ("a", ("href", "rel")), ("a", ("href", "rel", "title")),
}  # fmt: skip


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, attrs))

    handle_startendtag = handle_starttag


def elements(html: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    parser = _Elements()
    parser.feed(html)
    parser.close()
    return parser.elements


def signatures(html: str) -> set[tuple[str, tuple[str, ...]]]:
    """Each element as (tag, its attribute names): what markup, not what text, the page has."""
    return {(tag, tuple(sorted({name for name, _ in attrs}))) for tag, attrs in elements(html)}


def inert_problems(html: str, baseline: Iterable[tuple[str, tuple[str, ...]]]) -> list[str]:
    """Return how `html` differs in markup from `baseline` (the same page with harmless text).

    Allowed: the elements of the baseline and what the Markdown whitelist produces. Never
    allowed: event-handler attributes, script/data URLs, htmx attributes carrying a marker.
    """
    problems = []
    allowed = set(baseline) | MARKDOWN_ELEMENTS
    for tag, attrs in elements(html):
        signature = (tag, tuple(sorted({name for name, _ in attrs})))
        if signature not in allowed:
            problems.append(f"new markup: <{tag} {' '.join(signature[1])}>")
        for name, value in attrs:
            plain = re.sub(r"[\x00-\x20]", "", value or "").lower()
            if name.startswith("on"):
                problems.append(f"event handler: <{tag} {name}={value!r}>")
            if plain.startswith(_BAD_SCHEMES):
                problems.append(f"script URL: <{tag} {name}={value!r}>")
            if (name.startswith(("hx-", "data-hx-")) or name in ("src", "action")) and (
                "xss" in plain or "evil" in plain
            ):
                problems.append(f"hostile attribute: <{tag} {name}={value!r}>")
    return problems
