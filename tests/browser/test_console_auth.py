"""The console against a gateway with auth on: it asks for a token, uses it, and says
when it is refused or expired."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.async_api import Browser, expect

from tests.browser.test_console import (  # noqa: F401  (fixtures used by name)
    CHROMIUM,
    StartSim,
    browser,
    simulate,
)
from tests.integration.test_auth import auth_env, token
from tests.support import Gateway

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
]


async def test_console_asks_for_a_token_and_reports_refusal_and_expiry(
    browser: Browser,  # noqa: F811
    start_gateway: Callable[..., Gateway],
    simulate: StartSim,  # noqa: F811
) -> None:
    gw = start_gateway(auth_env())
    rid, _ = simulate("--agents", "3", "--deltas", "400", "--delta-interval", "0.05")
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    form, message = page.get_by_test_id("auth-form"), page.get_by_test_id("auth-message")

    # No token: the listing's 401 brings up the form.
    await page.goto(gw.http + "/")
    await expect(form).to_be_visible()
    await expect(message).to_contain_text("needs a token")

    # A bad token is refused, and the page says so.
    await page.get_by_test_id("auth-input").fill("not-a-token")
    await page.get_by_test_id("auth-submit").click()
    await expect(message).to_contain_text("malformed token")

    # A good one: the form goes away, the list and the tree come live.
    await page.get_by_test_id("auth-input").fill(token())
    await page.get_by_test_id("auth-submit").click()
    await expect(form).to_be_hidden()
    await expect(page.get_by_test_id(f"panel-{rid}")).to_be_visible(timeout=20_000)
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "live")
    stored = await page.evaluate("sessionStorage.getItem('relay.token')")
    assert stored and stored.count(".") == 2
    assert await page.evaluate("document.cookie") == ""  # never a cookie

    await context.close()

    # The URL `relay token` prints, opened in a new tab: #token=... is taken
    # into the tab's sessionStorage and out of the address bar.
    context = await browser.new_context()
    page = await context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    form, message = page.get_by_test_id("auth-form"), page.get_by_test_id("auth-message")
    short = token(ttl=3)
    await page.goto(f"{gw.http}/#token={short}&open={rid}")
    await expect(page.get_by_test_id(f"panel-{rid}")).to_be_visible(timeout=20_000)
    assert "token=" not in page.url
    assert await page.evaluate("sessionStorage.getItem('relay.token')") == short
    # ...and when it expires, the page says so instead of reconnecting in a loop.
    await expect(form).to_be_visible(timeout=15_000)
    await expect(message).to_contain_text("expired")
    await context.close()
    assert not errors, errors
