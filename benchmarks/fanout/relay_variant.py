"""Run the relay gateway with another WebSocket implementation or event loop.

``python -m benchmarks.fanout.relay_variant <ws> <loop>`` loads relay's
configuration from the environment exactly as ``relay gateway`` does and
serves it with uvicorn, swapping only what the benchmark compares:

* ``ws``: ``guarded`` (what ``relay gateway`` runs: uvicorn's
  websockets-sansio protocol with relay's limits), or one of uvicorn's own
  ``websockets-sansio``, ``websockets``, ``wsproto`` (without relay's fragment
  limits: for measuring only);
* ``loop``: ``uvloop`` or ``asyncio``.
"""

from __future__ import annotations

import sys

import uvicorn

from relay.config import load_config
from relay.gateway.serve import check_descriptors, tune_gc, uvicorn_config
from relay.logs import configure_logging


def main() -> None:
    ws, loop = sys.argv[1], sys.argv[2]
    config = load_config()
    configure_logging(config.log)
    check_descriptors(config)
    tune_gc()  # as run_gateway does
    uv = uvicorn_config(config)
    if ws not in ("guarded", "websockets-sansio-guarded"):
        uv.ws = ws
    uv.loop = loop
    uvicorn.Server(uv).run()


if __name__ == "__main__":
    main()
