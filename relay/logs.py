"""Logging setup: human-readable text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from relay.config import LogConfig

# Attributes a caller may attach with ``extra=`` that are worth a JSON field.
CONTEXT_FIELDS = ("request_id", "agent_id", "gateway_id", "connection_id", "command")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with request and agent ids when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: LogConfig) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())


class LogOnce:
    """Log each distinct cause once (up to ``limit`` causes), then count it silently.

    A client that sends the same bad frame in a loop, or a history entry that
    every resume trips over, must not write a line per occurrence: the log
    would grow with the attacker's effort. The count says how often it recurred.
    """

    def __init__(
        self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger], limit: int = 256
    ) -> None:
        self.logger = logger
        self.limit = limit
        self.counts: dict[str, int] = {}

    def __call__(
        self, cause: str, message: str, *args: object, exc: BaseException | None = None
    ) -> bool:
        """Log ``message`` at warning level the first time ``cause`` is seen; True if it was."""
        seen = self.counts.get(cause)
        if seen is not None:
            self.counts[cause] = seen + 1
            return False
        if len(self.counts) >= self.limit:
            return False  # bounded: a flood of distinct causes is not logged either
        self.counts[cause] = 1
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        self.logger.warning(message, *args, exc_info=exc_info)
        return True
