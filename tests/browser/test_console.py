"""The live console in a real browser: headless Chromium against real processes.

Each test runs its own redis-server, ``relay gateway`` and ``relay simulate``
and drives the page served at ``/`` the way a user does: open a request, cancel
agents, answer a budget pause, and ride out a gateway restart.

Set ``RELAY_CONSOLE_SCREENSHOT`` to a path to also keep a screenshot of the
budget test there (each test saves its own screenshots in its tmp dir).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright, expect

from tests.support import Gateway, RedisServer, RelayProcess, eventually

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
]

StartSim = Callable[..., tuple[str, RelayProcess]]


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


@pytest.fixture
def simulate(tmp_path: Path, redis_server: RedisServer) -> Iterator[StartSim]:
    """``simulate(*args)`` runs ``relay simulate`` for a fresh request id; returns (id, process)."""
    started: list[RelayProcess] = []

    def start(*args: str) -> tuple[str, RelayProcess]:
        rid = str(uuid.uuid4())
        proc = RelayProcess(
            ["simulate", "--request-id", rid, *args],
            env={"RELAY_REDIS_URL": redis_server.url},
            log=tmp_path / f"simulate-{len(started)}.log",
        )
        started.append(proc.start())
        return rid, proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser, gateway: Gateway) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(gateway.http + "/")
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "live")
    yield page
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def open_from_list(page: Page, rid: str) -> None:
    await page.get_by_test_id(f"request-{rid}").click(timeout=20_000)
    await expect(page.get_by_test_id(f"panel-{rid}")).to_be_visible()


def running_children(rid: str) -> str:
    return f"[data-testid=panel-{rid}] .children > .agent[data-status=running]"


async def test_page_is_self_contained(page: Page, gateway: Gateway) -> None:
    """No CDN, no external fonts: every request the page makes goes to the gateway."""
    hosts: set[str] = set()
    page.on("request", lambda req: hosts.add(re.sub(r"^\w+://([^/]+).*$", r"\1", req.url)))
    await page.reload()
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "live")
    assert hosts <= {f"127.0.0.1:{gateway.port}"}, hosts
    await expect(page.get_by_test_id("panels-empty")).to_be_visible()


async def test_a_fresh_page_opens_the_first_request_it_sees(page: Page, simulate: StartSim) -> None:
    """A newcomer sees a tree at once, without knowing to click the list."""
    rid, _ = simulate("--agents", "3", "--deltas", "200", "--delta-interval", "0.05")
    await expect(page.get_by_test_id(f"panel-{rid}")).to_be_visible(timeout=20_000)
    await expect(page.locator(f"[data-testid=panel-{rid}] .agent").first).to_be_visible()
    await page.get_by_test_id(f"close-{rid}").click()
    await expect(page.get_by_test_id(f"panel-{rid}")).to_have_count(0)
    await page.get_by_test_id(f"request-{rid}").click()  # the list reopens it
    await expect(page.get_by_test_id(f"panel-{rid}")).to_be_visible()


async def test_cancel_marks_agents_cancelled(
    page: Page, simulate: StartSim, tmp_path: Path
) -> None:
    rid, _ = simulate(
        "--agents", "6", "--delta-interval", "0.15", "--deltas", "80", "--tokens-per-delta", "5"
    )
    await open_from_list(page, rid)
    await expect(page.get_by_test_id(f"panel-status-{rid}")).to_have_text("running")

    # Cancel one running sub-agent: it (and its subtree) ends up cancelled.
    child = page.locator(running_children(rid)).first
    await expect(child).to_be_visible(timeout=20_000)
    aid = await child.get_attribute("data-agent-id")
    assert aid
    await page.get_by_test_id(f"cancel-{aid}").click()
    await expect(page.get_by_test_id(f"agent-status-{aid}")).to_have_text("cancelled")
    await expect(page.get_by_test_id(f"cancel-{aid}")).to_be_hidden()
    subtree = page.locator(f"[data-testid=agent-{aid}] .agent")
    for i in range(await subtree.count()):
        ended = re.compile("completed|cancelled")
        await expect(subtree.nth(i)).to_have_attribute("data-status", ended)
    await page.screenshot(path=str(tmp_path / "console-cancel-agent.png"))

    # Cancel the whole request: every agent still running is cancelled, root included.
    await page.get_by_test_id(f"cancel-{rid}").click()
    await expect(page.get_by_test_id(f"panel-status-{rid}")).to_have_text("cancelled")
    panel = page.get_by_test_id(f"panel-{rid}")
    await expect(panel.locator(".agent[data-status=running]")).to_have_count(0)
    await expect(panel.locator(".agent[data-status=cancelled]").first).to_be_visible()
    await expect(page.get_by_test_id(f"cancel-{rid}")).to_be_hidden()
    await expect(page.get_by_test_id(f"request-status-{rid}")).to_have_text("cancelled")
    await page.screenshot(path=str(tmp_path / "console-cancel-request.png"))


async def test_budget_continue_resumes_run(page: Page, simulate: StartSim, tmp_path: Path) -> None:
    rid, proc = simulate(
        "--agents",
        "4",
        "--depth",
        "2",
        "--budget",
        "10000",
        "--deltas",
        "25",
        "--delta-interval",
        "0.05",
        "--decision-timeout",
        "300",
    )
    # Open it by id (the other way in) before anything is published.
    await page.get_by_test_id("open-input").fill(rid)
    await page.get_by_test_id("open-submit").click()
    await expect(page.get_by_test_id(f"panel-{rid}")).to_be_visible()

    prompt = page.get_by_test_id("budget-prompt")
    await expect(prompt).to_be_visible(timeout=60_000)
    await expect(page.get_by_test_id(f"panel-status-{rid}")).to_have_text("paused")
    # The deadline comes from budget_pending: "Default “stop” in 4:59."
    await expect(prompt.locator(".deadline")).to_contain_text(re.compile(r"in \d+:\d\d"))
    await expect(page.get_by_test_id(f"budget-bar-{rid}")).to_have_attribute("data-tone", "warn")
    shot = tmp_path / "console-budget-paused.png"
    await page.screenshot(path=str(shot))
    if target := os.environ.get("RELAY_CONSOLE_SCREENSHOT"):
        await page.screenshot(path=target)

    used_before = await page.get_by_test_id(f"budget-text-{rid}").inner_text()
    await page.get_by_test_id("budget-continue").click()
    await expect(prompt).to_be_hidden()
    decision = page.get_by_test_id(f"decision-{rid}")
    await expect(decision).to_have_attribute("data-decided-by", "client")
    await expect(decision).to_contain_text("continue")
    # The run goes on past the pause: tokens keep growing and the request finishes.
    await expect(page.get_by_test_id(f"budget-text-{rid}")).not_to_have_text(used_before)
    await expect(page.get_by_test_id(f"panel-status-{rid}")).to_have_text(
        re.compile("completed|exhausted"), timeout=60_000
    )
    assert proc.wait(30) == 0, proc.output()
    await page.screenshot(path=str(tmp_path / "console-budget-done.png"))


async def test_resumes_after_gateway_restart(
    page: Page, gateway: Gateway, simulate: StartSim, tmp_path: Path
) -> None:
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(str(payload))))
    # Few tokens per delta: the run never reaches the budget warning.
    rid, proc = simulate(
        "--agents", "4", "--delta-interval", "0.1", "--deltas", "50", "--tokens-per-delta", "5"
    )
    await open_from_list(page, rid)
    await expect(page.locator(running_children(rid)).first).to_be_visible(timeout=20_000)

    before = len(sent)
    gateway.stop()
    status = page.get_by_test_id("conn-status")
    await expect(status).to_have_attribute("data-state", "reconnecting")
    await expect(status).to_contain_text("attempt")
    gateway.start()
    await expect(status).to_have_attribute("data-state", "live", timeout=30_000)

    # Resumed with after_seq: the run is followed to its end, with no duplicate agents.
    await expect(page.get_by_test_id(f"panel-status-{rid}")).to_have_text(
        "completed", timeout=60_000
    )
    assert proc.wait(30) == 0, proc.output()
    resumes = [json.loads(f) for f in sent[before:] if '"subscribe"' in f]
    assert resumes, sent[before:]
    assert resumes[0]["after_seq"] > 0 and resumes[0]["epoch"], resumes[0]
    assert "snapshot" not in resumes[0]
    await expect(page.get_by_test_id(f"panel-{rid}").locator(".note")).to_have_count(0)
    store_agents = await page.evaluate(f"window.relayConsole.store.views.get('{rid}').agents.size")
    assert await page.locator(f"[data-testid=panel-{rid}] .agent").count() == store_agents
    await page.screenshot(path=str(tmp_path / "console-resumed.png"))


async def test_protocol_edges_against_a_scripted_socket(browser: Browser, gateway: Gateway) -> None:
    """Junk frames are ignored, ``lagged`` shows a note, ``resync_required`` reloads a snapshot."""
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    received: list[dict[str, object]] = []
    subscribed_on: list[WebSocketRoute] = []  # the console's "detail" socket

    def snapshot(seq: int, status: str) -> str:
        agent = {
            "agent_id": root,
            "parent_id": None,
            "task_description": "Plan",
            "depth": 0,
            "status": status,
            "tokens_used": 0,
        }
        return json.dumps(
            {
                "type": "snapshot",
                "request_id": rid,
                "epoch": "e1",
                "seq": seq,
                "agents": [agent],
                "budget": None,
                "pending_decision": None,
                "last_decision": None,
                "synthesis_started": False,
                "outcome": None,
            }
        )

    def on_message(ws: WebSocketRoute, message: str | bytes) -> None:
        frame = json.loads(message)
        received.append(frame)
        subscribed_on.append(ws)
        if frame.get("type") == "subscribe" and frame.get("snapshot"):
            ws.send(json.dumps({"type": "subscribed", "request_id": rid, "epoch": "e1", "seq": 3}))
            ws.send(snapshot(3, "running" if len(received) == 1 else "completed"))

    def handler(ws: WebSocketRoute) -> None:
        ws.on_message(lambda message: on_message(ws, message))

    context = await browser.new_context()
    page = await context.new_page()
    await page.route_web_socket(re.compile(r"/ws/events\?stream=none$"), handler)
    await page.goto(f"{gateway.http}/#open={rid}")
    await expect(page.get_by_test_id(f"agent-status-{root}")).to_have_text("running")
    detail = subscribed_on[0]
    for junk in ("not json", "[1,2]", '{"no":"type"}', '{"type":"agent_text_delta"}'):
        detail.send(junk)
    delta = {
        "type": "agent_text_delta",
        "agent_id": root,
        "text": "hello",
        "request_id": rid,
        "seq": 4,
        "ts": 1,
    }
    detail.send(json.dumps(delta))
    detail.send(json.dumps({**delta, "text": "DUPLICATE", "seq": 4}))
    await expect(page.get_by_test_id(f"agent-text-{root}")).to_have_text("hello")
    detail.send(json.dumps({"type": "lagged", "request_id": rid, "skipped": 7}))
    await expect(page.get_by_test_id("note-lagged")).to_contain_text("7 event(s) skipped")

    detail.send(
        json.dumps(
            {"type": "resync_required", "request_id": rid, "epoch": "e2", "reason": "epoch_changed"}
        )
    )
    await expect(page.get_by_test_id(f"agent-status-{root}")).to_have_text("completed")
    subscribes = [f for f in received if f.get("type") == "subscribe"]
    assert [f.get("snapshot") for f in subscribes] == [True, True], received
    await context.close()


async def test_the_console_holds_no_tenant_wide_channel(
    page: Page, simulate: StartSim, gateway: Gateway, redis_server: RedisServer
) -> None:
    """The request list comes from the listing, so a console showing one
    request costs its gateway that request's traffic only."""
    rid, _ = simulate("--agents", "2", "--deltas", "200", "--delta-interval", "0.05")
    await open_from_list(page, rid)
    await expect(page.locator("[data-testid^='agent-status-']").first).to_be_visible()
    client = redis.Redis.from_url(redis_server.url)
    try:
        channels = {c.decode() for c in cast(list[bytes], client.pubsub_channels("relay:*"))}
    finally:
        client.close()
    assert "relay:default:events" not in channels, channels
    assert f"relay:default:req:{{{rid}}}:events" in channels, channels


def streamed_texts(redis_server: RedisServer, rid: str) -> dict[str, str]:
    """Each agent's whole text, rebuilt from the request's history in Redis."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(
            f"relay:default:req:{{{rid}}}:history"))  # fmt: skip
    finally:
        client.close()
    texts: dict[str, str] = {}
    for _, fields in entries:
        event = json.loads(fields[b"f"])
        if event["type"] == "agent_text_delta":
            texts[event["agent_id"]] = texts.get(event["agent_id"], "") + event["text"]
    return texts


async def test_a_late_joiner_shows_the_text_so_far_from_the_snapshot(
    browser: Browser, simulate: StartSim, gateway: Gateway, redis_server: RedisServer
) -> None:
    """A finished request opened afterwards shows every agent's text, and no delta
    crossed the socket: it all came in the snapshot. A request joined mid-run
    then shows each text exactly once when it ends (snapshot + live deltas)."""
    done, proc = simulate(
        "--agents", "3", "--deltas", "40", "--delta-interval", "0", "--tokens-per-delta", "5"
    )
    assert proc.wait(60) == 0, proc.output()
    texts = streamed_texts(redis_server, done)
    assert len(texts) >= 3
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    received: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda p: received.append(str(p))))
    await page.goto(f"{gateway.http}/#open={done}")
    await expect(page.get_by_test_id(f"panel-status-{done}")).to_have_text("completed")
    for agent, text in texts.items():
        await expect(page.get_by_test_id(f"agent-text-{agent}")).to_have_text(text[-2048:])
    assert any('"snapshot"' in f for f in received)
    assert not [f for f in received if '"agent_text_delta"' in f]
    await context.close()

    # Joined while its agents stream: the text so far, then the rest, once.
    live, running = simulate(
        "--agents", "3", "--deltas", "120", "--delta-interval", "0.02", "--tokens-per-delta", "5"
    )
    await eventually(
        lambda: len(streamed_texts(redis_server, live)) >= 2, 30, "the run streams text"
    )
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    await page.goto(f"{gateway.http}/#open={live}")
    await expect(page.get_by_test_id(f"panel-status-{live}")).to_have_text(
        "completed", timeout=60_000
    )
    assert running.wait(30) == 0, running.output()
    final = streamed_texts(redis_server, live)
    for agent, text in final.items():
        shown = await page.evaluate(
            "([rid, aid]) => window.relayConsole.store.views.get(rid).agents.get(aid).text",
            [live, agent],
        )
        assert shown == text[-2048:], agent
    await context.close()
