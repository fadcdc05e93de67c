"""The interactive API docs at /api/v1/docs (issue 12, point 8): Swagger UI from the pinned plugin
package, every file from this site, under the site's Content-Security-Policy (but for data:
images), linked from the Tokens page and the README. tests/test_browser_newcomer.py drives it
in Chromium, Authorize and Try it out included."""

from __future__ import annotations

from tests import browser as parts
from tests.browser import WIDTHS, expect, needs_chromium
from tests.helpers import ROOT, Tags, api_client, login, make_user
from webapp.security import CONTENT_SECURITY_POLICY

browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker
shots = parts.shots  # where screenshots go


def test_the_api_docs_are_served_from_this_site_under_the_sites_csp(app, client):
    response = client.get("/api/v1/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    # The site's policy, but for the data: images Swagger UI's stylesheet draws its icons with.
    policy = response.headers["Content-Security-Policy"]
    assert policy == CONTENT_SECURITY_POLICY.replace("img-src 'self';", "img-src 'self' data:;")
    assert policy != CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in policy and "style-src 'self';" in policy
    page = Tags(response.text)
    scripts = [attrs["src"] for attrs in page.all("script")]
    styles = [attrs["href"] for attrs in page.all("link") if attrs.get("rel") == "stylesheet"]
    assert "<script>" not in response.text and "<style" not in response.text  # nothing inline for the CSP to refuse
    assert all(url.startswith("/") and not url.startswith("//") for url in scripts + styles)
    for url in scripts + styles:
        assert client.get(url).status_code == 200, url
    assert "/api/v1/docs/ui/js/swagger-ui-bundle.js" in scripts
    assert 'data-spec-url="/api/v1/openapi.json"' in response.text


def test_the_docs_are_linked_from_the_tokens_page_and_the_readme(app, client):
    make_user(app)
    login(client)
    assert 'href="/api/v1/docs"' in client.get("/tokens").text
    assert "/api/v1/docs" in (ROOT / "README.md").read_text()


@needs_chromium
def test_the_interactive_api_docs_work_from_this_site(page, app, watch, shots):
    """Swagger UI lists the operations and, with a token under Authorize, calls the API: no CSP
    violation, no request anywhere else (the page fixture fails on either)."""
    api = api_client(app)
    page.goto("/tokens")  # signed out: the sign-in page; the docs are public
    page.goto("/api/v1/docs")
    expect(page.get_by_role("heading", name="Async AI Task Runner API")).to_be_visible()
    expect(page.get_by_text("Submit a prompt")).to_be_visible()
    page.locator(".auth-wrapper button.authorize").click()
    page.locator(".modal-ux input").first.fill(api.token)
    page.locator(".modal-ux button.authorize").click()  # "Apply credentials"
    page.locator(".modal-ux button.btn-done").click()
    operation = page.locator(".opblock", has_text="Models you can use")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    with page.expect_response(lambda response: response.url.endswith("/api/v1/models")) as answer:
        operation.get_by_role("button", name="Execute").click()
    assert answer.value.status == 200
    expect(operation.locator(".live-responses-table")).to_contain_text("200")
    for label, width in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(shots / f"api-docs-{label}.png"))
    assert all(url.startswith(watch.origin) for url in watch.requests)
