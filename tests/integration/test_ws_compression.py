"""permessage-deflate: off unless ``gateway.ws_per_message_deflate`` turns it on.

Every client here offers the extension (as browsers do); the gateway's
handshake answer says whether it was taken.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import websockets

from tests.support import Gateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


async def negotiated(gw: Gateway) -> str | None:
    url = f"{gw.ws_url}?request_id={uuid.uuid4()}"
    async with websockets.connect(url, compression="deflate") as ws:
        assert ws.response is not None
        return ws.response.headers.get("Sec-WebSocket-Extensions")


async def test_deflate_is_declined_by_default(start_gateway: StartGateway) -> None:
    assert await negotiated(start_gateway()) is None


async def test_deflate_is_negotiated_when_configured(start_gateway: StartGateway) -> None:
    gw = start_gateway({"RELAY_GATEWAY_WS_PER_MESSAGE_DEFLATE": "true"})
    extensions = await negotiated(gw)
    assert extensions is not None and "permessage-deflate" in extensions
