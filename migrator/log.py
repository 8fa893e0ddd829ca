"""Structured logging: one event per line, with bound context; pretty on a terminal, JSON otherwise.

Log lines carry keys (table, chunk, event ids), never row values. Every rendered value passes through
`redaction.scrub`, so that a DSN that slips into an exception message loses its password and a server error its row
values (DETAIL, CONTEXT), tracebacks included.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from migrator.redaction import scrub

_configured = False
_json = False


def _redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = scrub(value)
    return event_dict


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Set up structlog once. `json=None` picks JSON unless stderr is a terminal."""
    global _configured, _json
    if json is None:
        json = not sys.stderr.isatty()
    _json = json
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
        # One write per line (the line and its newline together): a copy's worker processes share the
        # coordinator's stderr, and two writes per line let another process's line fall between them.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def renders_json() -> bool:
    """Whether log lines are JSON (what `configure` chose), for worker processes that log alike."""
    return _json


def get(**context: Any) -> Any:
    """A logger with bound context (phase, table, chunk ...)."""
    if not _configured:
        configure()
    return structlog.get_logger("migrator").bind(**context)
