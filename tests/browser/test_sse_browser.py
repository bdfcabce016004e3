"""A browser's own ``EventSource`` follows a run through HAProxy while its gateway is killed.

Headless Chromium opens ``/sse/events`` through HAProxy in front of two
gateways and renders every event into the page. The gateway serving it is
SIGKILLed mid-run; nothing in the page reconnects by hand: the browser's
EventSource does, after the ``retry:`` delay, with ``Last-Event-ID``, and
the balancer sends it to the other gateway. The page must end up showing
every event of the run exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

from relay.wire.events import EVENT_TYPES
from tests.browser.test_console import CHROMIUM, CHROMIUM_ARGS
from tests.integration.test_topology import MEDIUM_RUN, QUIET, HAProxy, wait_exit
from tests.support import Gateway, RedisServer, RelayProcess, WsClient, eventually, metric
from tests.unit.test_deploy_files import HAPROXY, HAPROXY_CFG, localize_haproxy_cfg

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed"),
]

CONTROL_TYPES = ("subscribed", "snapshot", "budget_pending", "resync_required", "lagged", "close")

# The page: an EventSource and a list it appends every event to. Nothing here
# reconnects: that is the browser's job.
WATCH = """([url, types]) => {
  window.relay = {opens: 0, errors: 0, controls: [], ids: []};
  const list = document.createElement("ol");
  list.id = "events";
  document.body.replaceChildren(list);
  const es = new EventSource(url);
  window.relay.es = es;
  es.onopen = () => { window.relay.opens += 1; };
  es.onerror = () => { window.relay.errors += 1; };
  const show = (e) => {
    const frame = JSON.parse(e.data);
    if (!("ts" in frame)) { window.relay.controls.push(frame); return; }
    const item = document.createElement("li");
    item.dataset.seq = String(frame.seq);
    item.dataset.id = e.lastEventId;
    item.textContent = `${frame.seq} ${frame.type}`;
    list.appendChild(item);
  };
  for (const t of types) es.addEventListener(t, show);
}"""


class TwoGateways:
    def __init__(self, tmp: Path, gateways: dict[str, Gateway]) -> None:
        self.gateways = gateways
        # HAProxy() localizes the whole file, which names gateway3 too: give it
        # a port; the file is rewritten without that server right after.
        self.lb = HAProxy(tmp, {**gateways, "gateway3": gateways["gateway2"]})
        # The shipped configuration with its third server left out.
        text = "".join(
            line
            for line in HAPROXY_CFG.read_text().splitlines(keepends=True)
            if "server gateway3" not in line
        )
        ports = {name: gw.port for name, gw in gateways.items()}
        self.lb.cfg.write_text(localize_haproxy_cfg(text, self.lb.port, ports))

    def streams(self, name: str) -> int:
        status, body = self.gateways[name].get("/readyz")
        assert status == 200, body
        return int(metric(self.gateways[name], "relay_connections"))


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
            assert not errors, errors
        finally:
            await browser.close()


async def shown(page: Page) -> list[int]:
    seqs: list[int] = await page.eval_on_selector_all(
        "#events li", "items => items.map(i => Number(i.dataset.seq))"
    )
    return seqs


async def relay_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(
        "() => ({opens: relay.opens, errors: relay.errors, controls: relay.controls,"
        " state: relay.es.readyState})"
    )
    return state


async def test_event_source_survives_a_killed_gateway_behind_haproxy(
    tmp_path: Path,
    redis_server: RedisServer,
    start_gateway: Callable[..., Gateway],
    page: Page,
) -> None:
    gateways = {"gateway1": start_gateway(), "gateway2": start_gateway()}
    topo = TwoGateways(tmp_path, gateways)
    topo.lb.start()
    sim: RelayProcess | None = None
    try:
        rid = str(uuid.uuid4())
        await page.goto(topo.lb.http + "/healthz")  # any page of the balancer's origin
        url = f"/sse/events?request_id={rid}&after_seq=0"
        await page.evaluate(WATCH, [url, sorted(EVENT_TYPES) + list(CONTROL_TYPES)])
        await eventually(lambda: sum(map(topo.streams, gateways)) == 1, 10, "the stream open")
        victim = max(gateways, key=topo.streams)

        sim = RelayProcess(
            ["simulate", "--request-id", rid, *MEDIUM_RUN, *QUIET],
            {"RELAY_REDIS_URL": redis_server.url},
            tmp_path / "simulate.log",
        ).start()
        await poll(page, lambda seqs: len(seqs) >= 20, 30, "20 events shown")
        assert sim.alive(), "the run ended before the kill; make it longer"
        gateways[victim].stop(signal.SIGKILL)

        assert await wait_exit(sim, 90) == 0, sim.output()
        async with WsClient(topo.lb.http.replace("http", "ws") + "/ws/events") as probe:
            reply = await probe.request({"type": "subscribe", "request_id": rid}, "subscribed")
        last = int(reply["seq"])
        await poll(page, lambda seqs: seqs[-1:] == [last], 30, "the last event shown")
        seqs = await shown(page)
        state = await relay_state(page)
        survivor = next(n for n in gateways if n != victim)
        on_survivor = topo.streams(survivor)  # the stream now lives on the other gateway
        await page.screenshot(path=str(tmp_path / "sse-browser.png"))
    finally:
        if sim is not None:
            sim.stop(signal.SIGKILL)
        topo.lb.stop()

    assert seqs == list(range(1, last + 1)), f"duplicates or gaps: {len(seqs)} shown of {last}"
    assert on_survivor == 1
    assert state["opens"] >= 2 and state["errors"] >= 1, state  # it did reconnect, by itself
    assert state["state"] != 2, "the EventSource gave up"  # 2: CLOSED
    assert not [c for c in state["controls"] if c.get("type") == "resync_required"], state
    print(json.dumps({"shown": len(seqs), "opens": state["opens"]}))


async def poll(page: Page, check: Callable[[list[int]], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        seqs = await shown(page)
        if check(seqs):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what}: {len(seqs)} shown, state {await relay_state(page)}")
        await asyncio.sleep(0.1)
