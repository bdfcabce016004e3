"""The WebSocket gateway: Starlette app, pub/sub hub, per-client connections."""

from relay.gateway.app import create_app

__all__ = ["create_app"]
