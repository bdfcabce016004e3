"""The README's orchestrator example, extracted from README.md and run as a user would.

The block is read from the README at test time, so the README and this test
cannot drift: edit the example and this runs the edit. It runs as its own
process (``python example.py``) against a real redis-server, configured only
through ``RELAY_REDIS_URL``; a viewer on a real gateway then replays what
it published.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Gateway, RedisServer, WsClient

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The first ```python block of the README's "Orchestrator SDK" section."""
    text = README.read_text("utf-8")
    section = text.split("### Orchestrator SDK\n", 1)[1].split("\n### ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match is not None, "no python block in the README's Orchestrator SDK section"
    return match.group(1)


def test_the_example_is_a_short_complete_program() -> None:
    code = readme_example()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 25, f"the README promises a short orchestrator: {len(lines)} lines"
    assert "asyncio.run(main())" in code and "relay.connect" in code


async def test_the_readme_orchestrator_runs_against_redis_and_a_gateway(
    tmp_path: Path, redis_server: RedisServer, start_gateway: Callable[..., Gateway]
) -> None:
    gw = start_gateway()
    script = tmp_path / "example.py"
    script.write_text(readme_example(), "utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_REDIS_URL"] = redis_server.url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    rid, outcome = out.decode().split()
    assert outcome == "completed"

    async with WsClient(gw.ws_url) as viewer:
        await viewer.request({"type": "subscribe", "request_id": rid, "after_seq": 0}, "subscribed")
        await viewer.wait_for(
            lambda c: sum(f["type"] == "agent_completed" for f in c.events(rid)) == 2
        )
    frames = viewer.events(rid)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    spawned = [f for f in frames if f["type"] == "agent_spawned"]
    root, child = spawned
    assert (root["parent_id"], child["parent_id"]) == (None, root["agent_id"])
    texts = {
        a: "".join(f["text"] for f in frames if f.get("agent_id") == a and "text" in f)
        for a in (root["agent_id"], child["agent_id"])
    }
    assert texts[child["agent_id"]].strip() == "Notes on sources: prices rose three percent."
    assert texts[root["agent_id"]].strip() == "Notes on prices: prices rose three percent."
    ends = {f["agent_id"]: f for f in frames if f["type"] == "agent_completed"}
    assert ends[root["agent_id"]]["result_summary"] == "Prices rose 3%"
    assert ends[child["agent_id"]]["tokens_used"] == ends[root["agent_id"]]["tokens_used"] == 7
    assert frames[-1]["type"] == "agent_completed" and frames[-1]["agent_id"] == root["agent_id"]
    updates = [f for f in frames if f["type"] == "budget_update"]
    assert updates[-1]["tokens_used"] == 14 and updates[-1]["budget_total"] == 200_000
