"""Run the gateway under uvicorn: the Python API behind ``relay gateway``.

On SIGTERM uvicorn stops accepting, closes every WebSocket with 1012
(service restart, so clients reconnect elsewhere and resume with
``after_seq``), waits up to ``gateway.drain_timeout`` for connections to
finish, then runs the lifespan shutdown; the process exits well inside 10 s.
"""

from __future__ import annotations

import uvicorn

from ..config import GlobalConfig
from .app import create_app


def uvicorn_config(config: GlobalConfig) -> uvicorn.Config:
    """The uvicorn settings derived from relay's configuration."""
    gw = config.gateway
    return uvicorn.Config(
        create_app(config),
        host=gw.host,
        port=gw.port,
        ws="websockets-sansio",
        # Protocol pings close dead peers; the size limit is a hard ceiling
        # above max_message_bytes, which is answered with an error frame.
        ws_ping_interval=gw.ping_interval,
        ws_ping_timeout=gw.ping_timeout,
        ws_max_size=max(gw.max_message_bytes * 4, 1 << 20),
        timeout_graceful_shutdown=int(gw.drain_timeout),
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )


def run_gateway(config: GlobalConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    uvicorn.Server(uvicorn_config(config)).run()
