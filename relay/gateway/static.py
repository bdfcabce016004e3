"""The live console: static HTML, CSS and JavaScript shipped in the package.

No build step and no CDN: the files under ``relay/gateway/assets`` are served as they
are, so the console works on an offline machine. Every response is
``no-cache`` (the browser revalidates, so an upgraded gateway serves the new
console at once) and carries a Content-Security-Policy that allows nothing but
the gateway itself.

``GET /api/v1/requests`` lists the requests that published recently (newest
first, with their outcome and whether a budget decision is pending), so a
console opened in the middle of a run also shows requests that are quiet right
now, such as one paused for a budget decision. With ``?agents=1`` each entry
also counts the agents of the request and those still running (the console
polls it instead of watching every event of the tenant).
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from relay.gateway.guard import HttpRefusal
from relay.wire.commands import CommandError
from relay.wire.keys import Keys
from relay.wire.scripts import as_text

log = logging.getLogger(__name__)

CONSOLE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
    ),
}

RECENT_WINDOW_SECONDS = 24 * 3600
RECENT_MAX = 200


def _static_dir() -> str:
    return str(resources.files("relay.gateway").joinpath("assets"))


class _ConsoleFiles(StaticFiles):
    """``StaticFiles`` with the console's headers on every file.

    ``.js`` is always served as JavaScript: the console is made of module
    scripts, which browsers refuse under any other type (and ``nosniff``), and
    ``mimetypes`` reads the platform's table, which can say otherwise.
    """

    def file_response(
        self,
        full_path: PathLike,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(CONSOLE_HEADERS)
        if response.status_code == 200 and str(full_path).endswith(".js"):
            response.headers["content-type"] = "text/javascript; charset=utf-8"
        return response


async def index(request: Request) -> Response:
    """The console page."""
    return FileResponse(
        f"{_static_dir()}/index.html", media_type="text/html", headers=CONSOLE_HEADERS
    )


def _int_param(request: Request, name: str, default: int, upper: int) -> int:
    try:
        return max(1, min(upper, int(request.query_params.get(name, default))))
    except ValueError:
        return default


async def recent_requests(request: Request) -> Response:
    """Requests that published in the last ``window`` seconds, newest first (at most ``limit``)."""
    services: Any = request.app.state.services
    try:
        principal = await services.principal(request)
        principal.require("view")
    except HttpRefusal as refusal:
        return refusal.response()
    except CommandError as exc:
        return JSONResponse(exc.frame(), status_code=403)
    redis = services.redis
    # The token's tenant only; a token scoped to requests lists only those.
    keys = Keys(principal.tenant)
    limit = _int_param(request, "limit", 50, RECENT_MAX)
    window = _int_param(request, "window", RECENT_WINDOW_SECONDS, RECENT_WINDOW_SECONDS)
    floor = int((time.time() - window) * 1000)
    try:
        if principal.requests is None:
            rows = await redis.zrevrangebyscore(
                keys.active, "+inf", floor, start=0, num=limit, withscores=True
            )
        else:
            # A scoped token: look its own requests up (at most MAX_TOKEN_REQUESTS).
            scope = sorted(principal.requests)
            scores = await redis.zmscore(keys.active, scope)
            found = [(r, s) for r, s in zip(scope, scores, strict=True) if s and s >= floor]
            rows = sorted(found, key=lambda row: -row[1])[:limit]
        details = request.query_params.get("agents") in ("1", "true")
        pipe = redis.pipeline(transaction=False)
        ids = [as_text(r) for r, _ in rows]
        for rid in ids:
            rk = keys.request(rid)
            pipe.exists(rk.pending)
            pipe.hget(rk.state, "outcome")
            pipe.hget(rk.state, "budget")
            if details:
                pipe.hvals(rk.state)
        replies = await pipe.execute()
    except RedisError as exc:
        log.warning("listing recent requests failed: %s", exc)
        frame = {"type": "error", "code": "unavailable", "message": "Redis is unavailable"}
        return JSONResponse(frame, status_code=503)
    items: list[dict[str, Any]] = []
    width = 4 if details else 3
    for i, (rid, (_, score)) in enumerate(zip(ids, rows, strict=True)):
        pending, outcome, budget = replies[width * i : width * i + 3]
        item: dict[str, Any] = {
            "request_id": rid,
            "last_ts": int(score),
            "budget_pending": bool(pending),
            "outcome": json.loads(outcome) if outcome else None,
            "budget": json.loads(budget) if budget else None,
        }
        if details:
            item["agents"], item["running"] = _agent_counts(replies[width * i + 3])
        items.append(item)
    return JSONResponse({"requests": items}, headers={"Cache-Control": "no-store"})


def _agent_counts(values: list[bytes]) -> tuple[int, int]:
    """How many agents a request's state holds, and how many are not finished."""
    agents = running = 0
    for raw in values:
        if not raw.startswith(b'{"'):
            continue  # scalar fields (last_seq, epoch, ...)
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and "spawned_seq" in entry:  # agents, not the outcome
            agents += 1
            running += entry["status"] in ("running", "retrying")
    return agents, running


def console_routes() -> list[BaseRoute]:
    """``/`` (the console page) and ``/static/*`` (its assets)."""
    return [
        Route("/", index),
        Route("/api/v1/requests", recent_requests),
        Mount("/static", app=_ConsoleFiles(directory=_static_dir()), name="static"),
    ]
