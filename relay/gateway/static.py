"""The live console: static HTML, CSS and JavaScript shipped in the package.

No build step and no CDN: the files under ``relay/static`` are served as they
are, so the console works on an offline machine.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles


def _static_dir() -> str:
    return str(resources.files("relay").joinpath("static"))


async def index(request: Request) -> Response:
    return FileResponse(f"{_static_dir()}/index.html", media_type="text/html")


def console_routes() -> list[BaseRoute]:
    """``/`` (the console page) and ``/static/*`` (its assets)."""
    return [
        Route("/", index),
        Mount("/static", app=StaticFiles(directory=_static_dir()), name="static"),
    ]
