"""`migrator console [--listen HOST:PORT]`: the cutover-night web page for the operator, the migration lead and
clinical staff, live.

One page shows where the migration stands and the next step, each table's copy and pending events, the lag and its
history (the samples sync records), the go/no-go checklist re-evaluated, the hold and pending intents, a cutover's or
rollback's steps as they start and end with the freeze and pause clocks running, and the audit trail. Updates are
pushed to the browser by server-sent events as soon as the poller reads them (every `[console] poll_interval`).

The modules: `poller` (the one loop reading the databases for every viewer), `view` (what the page gets), `actions`
(the named actions, audited before they start; cutover, rollback and verify run detached as the CLI's own command),
`security` (operator tokens, where it may listen), `app` (the Starlette application), `metrics` (/metrics), and
`static/` (the page, its script and style: shipped in the package, nothing loads from elsewhere).
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

import click
import uvicorn

from migrator import db, state
from migrator.config import Config
from migrator.console.actions import Runner
from migrator.console.app import make_app
from migrator.console.poller import Poller
from migrator.console.security import Operators, beside, check_listen, operators, split_listen
from migrator.errors import ConfigError, ConnectionFailed
from migrator.log import get


class Console:
    """The console's parts, served on a socket of its own (so that port 0 picks a free one)."""

    def __init__(self, cfg: Config, *, listen: str | None = None, insecure: bool = False,
                 ops: Operators | None = None) -> None:
        self.cfg = cfg
        listen = listen or cfg.console.listen
        self.warning = check_listen(cfg, listen, insecure)
        self.operators = ops or operators(cfg, state.operator())
        _upgrade(cfg)
        self.runner = Runner(cfg)
        self.poller = Poller(cfg, self.runner)
        self.app = make_app(cfg, self.poller, self.runner, self.operators)
        host, port = split_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(128)  # connections made once the address is printed wait until it serves
        except OSError as exc:
            self.sock.close()
            raise ConfigError(f"the console cannot listen on {listen}: {exc.strerror}",
                              hint="Choose another address with --listen (or [console] listen).") from exc
        c = cfg.console
        cert = str(beside(cfg, c.tls_certfile)) if c.tls_certfile else None
        key = str(beside(cfg, c.tls_keyfile)) if c.tls_keyfile else None
        tls = cert is not None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{shown}:{self.sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, lifespan="off",
            ssl_certfile=cert, ssl_keyfile=key))
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Serve until SIGINT or SIGTERM (the command's way)."""
        self.poller.start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.poller.stop()
            self.sock.close()

    def start(self) -> Console:
        """Serve from a thread (tests, benchmarks); `stop` ends it."""
        self.poller.start()
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return self

    def stop(self) -> None:
        self.poller.stop()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> Console:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


def _upgrade(cfg: Config) -> None:
    """Bring a control schema from before the audit trail up to date (as prepare would); nothing before prepare."""
    try:
        with db.session(cfg.target_dsn, role="target", connect_timeout=5) as target:
            if state.exists(target) and not state.audit_present(target):
                state.upgrade(target)
    except ConnectionFailed as exc:
        get(phase="console").warning("console.target_unreachable", error=str(exc).splitlines()[0])


def run(cfg: Config, *, listen: str | None = None, insecure: bool = False) -> None:
    console = Console(cfg, listen=listen, insecure=insecure)
    say = click.echo
    say(f"console: {console.url} (anyone who reaches it may look; actions need an operator token)", err=True)
    if console.warning:
        say(console.warning, err=True)
    if console.operators.generated:
        who, token = console.operators.generated
        say(f"operator token for {who} (shown once; give it in the page to act): {token}", err=True)
    sys.stderr.flush()
    get(phase="console").info("console.started", url=console.url, operators=len(console.operators.digests))
    try:
        console.serve()
    except KeyboardInterrupt:  # SIGINT or SIGTERM, once the server has closed: the normal way to stop it
        pass
    say("console: stopped (commands it started run on, each under its guardian)", err=True)
