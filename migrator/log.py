"""Structured logging: one event per line, with bound context; pretty on a terminal, JSON otherwise.

Log lines carry keys (table, chunk, event ids), never row values. Every rendered line passes through `redact` so that a
DSN that slips into an exception message loses its password.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from migrator.config import redact

_configured = False


def _redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Set up structlog once. `json=None` picks JSON unless stderr is a terminal."""
    global _configured
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get(**context: Any) -> Any:
    """A logger with bound context (phase, table, chunk ...)."""
    if not _configured:
        configure()
    return structlog.get_logger("migrator").bind(**context)
