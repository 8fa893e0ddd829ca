"""The console's web application (Starlette): the page, its assets, server-sent events, the JSON API, /metrics.

    GET  /                      the page (plain HTML; migrator/console/static/)
    GET  /static/...            its script and style, shipped in the package: nothing loads from elsewhere
    GET  /api/events            server-sent events: the view, each time it changes
    GET  /api/view              the view, once
    GET  /api/status            `migrator status --json`, as the poller last read it
    GET  /api/audit             `migrator audit --json`
    GET  /metrics               Prometheus' text format
    POST /api/actions/NAME      an action: header X-Migrator-Token, JSON {"confirm": "...", "overrides": [...]}

Every answer carries a strict Content-Security-Policy (scripts and styles from this origin only, no frames). An
action must come as JSON (a form another site posts cannot be) with the token in its header, from no other origin.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from migrator import audit
from migrator.config import Config
from migrator.console import metrics
from migrator.console.actions import SPECS, Runner
from migrator.console.poller import CountingCursor, Poller
from migrator.console.security import HEADER, Operators, Throttle

SSE_POLL = 0.1
"""Seconds between an event stream's looks at the view's version (memory only: no database)."""
CLOCK_EVERY = 5.0
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Api:
    """The handlers, around the poller (what the page sees), the runner (what operators do) and their tokens."""

    def __init__(self, cfg: Config, poller: Poller, runner: Runner, operators: Operators) -> None:
        self.cfg, self.poller, self.runner, self.operators = cfg, poller, runner, operators
        self.throttle = Throttle()
        self.page = resources.files("migrator.console").joinpath("static", "index.html").read_text()

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def view(self, request: Request) -> Response:
        return Response(self.poller.snapshot()[1], media_type="application/json")

    async def status(self, request: Request) -> Response:
        return Response(json.dumps(self.poller.status, default=str), media_type="application/json")

    async def audit_trail(self, request: Request) -> Response:
        trail = await run_in_threadpool(audit.read, self.cfg)
        return Response(json.dumps(trail.to_dict(), default=str), media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(metrics.render(self.poller.view, CountingCursor.sent),
                                 media_type=metrics.CONTENT_TYPE)

    async def events(self, request: Request) -> Response:
        return StreamingResponse(self._stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    async def _stream(self) -> AsyncIterator[str]:
        """A `view` event each time the view changes; a `clock` event (the target's time, which times the steps, for
        the page's running clocks) first and every CLOCK_EVERY seconds, which also keeps the connection alive."""
        sent, beat = -1, -float("inf")
        while not self.poller.stopped:
            if time.monotonic() - beat >= CLOCK_EVERY:
                beat = time.monotonic()
                yield f"event: clock\ndata: {self.poller.now().isoformat()}\n\n"
            version, text = self.poller.snapshot()
            if version != sent:
                sent = version
                yield f"id: {version}\nevent: view\ndata: {text}\n\n"
            await asyncio.sleep(SSE_POLL)

    async def act(self, request: Request) -> Response:
        name = request.path_params["name"]
        refused = self._refused(request, name)
        if refused is not None:
            return refused
        client = request.client.host if request.client else "unknown"
        operator = self.operators.who(request.headers.get(HEADER))
        if operator is None:
            await asyncio.sleep(self.throttle.delay(client))
            why = "a wrong operator token" if request.headers.get(HEADER) else "no operator token"
            await run_in_threadpool(audit.refused, self.cfg, SPECS[name].audit_name, {},
                                    actor=f"unknown ({client})", via="console",
                                    detail=f"{why} (header X-Migrator-Token)")
            self.poller.wake()
            return JSONResponse({"error": f"{SPECS[name].label}: refused: {why}",
                                 "hint": "Give your operator token (the X-Migrator-Token header)."}, 401)
        self.throttle.succeeded(client)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, 400)
        outcome = await run_in_threadpool(self.runner.perform, name, operator, body)
        if outcome.code < 300:
            self.poller.recheck()
        else:
            self.poller.wake()
        return JSONResponse(outcome.body, outcome.code)

    def _refused(self, request: Request, name: str) -> Response | None:
        """An action name that does not exist, a body that is not JSON, a request from another site."""
        if name not in SPECS:
            return JSONResponse({"error": f"no action {name}; actions: {', '.join(SPECS)}"}, 404)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "an action is sent as application/json"}, 415)
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return JSONResponse({"error": "refused: the request comes from another site"}, 403)
        return None


class SecurityHeaders:
    """ASGI middleware: every answer gets HEADERS (unless it set one itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in HEADERS.items() if k.lower().encode() not in have]
            await send(message)

        await self.app(scope, receive, with_headers)


def make_app(cfg: Config, poller: Poller, runner: Runner, operators: Operators) -> Starlette:
    api = Api(cfg, poller, runner, operators)
    return Starlette(routes=[
        Route("/", api.index),
        Route("/api/view", api.view),
        Route("/api/status", api.status),
        Route("/api/audit", api.audit_trail),
        Route("/api/events", api.events),
        Route("/metrics", api.metrics),
        Route("/api/actions/{name}", api.act, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("migrator.console", "static")]), name="static"),
    ], middleware=[Middleware(SecurityHeaders)])


