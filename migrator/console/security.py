"""Who may act, and where the console may listen.

The console can freeze a hospital's database, so: it listens on loopback unless told otherwise, and an address
beyond it needs TLS (a certificate and key) or `--insecure`, which prints a warning. Anyone who reaches the page may
look; every action needs an operator's own token, sent in a header (`X-Migrator-Token`: a cross-site page cannot set
it, and no cookie carries it), compared in constant time against each operator's. Tokens come from
`[console] operators_file` (`name = "token"`, one line per operator, at least 16 characters each), or, without it,
one is made at start for the operator who started the console (user@host) and printed once. Failed attempts are
slowed down (doubling per failure from one address, up to `MAX_DELAY` seconds) and audited.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import stat
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from migrator.config import Config
from migrator.errors import ConfigError

HEADER = "x-migrator-token"
MIN_TOKEN = 16
FIRST_DELAY = 0.5
"""Seconds a first failed attempt waits before its answer; each further failure from the same address doubles it."""
MAX_DELAY = 8.0
FORGET_AFTER = 600.0
"""Seconds after which an address's failures are forgotten."""


@dataclass(frozen=True)
class Operators:
    """Operator name -> token digest. `generated` holds the token made at start (printed once), if one was."""

    digests: dict[str, bytes]
    generated: tuple[str, str] | None = None

    @classmethod
    def of(cls, tokens: dict[str, str]) -> Operators:
        """Operators from name -> token (as an operators file gives them)."""
        return cls({name: _digest(token) for name, token in tokens.items()})

    def who(self, token: str | None) -> str | None:
        """The operator the token belongs to, or None; every operator's digest is compared, in constant time."""
        if not token:
            return None
        given = _digest(token)
        found = None
        for name, digest in self.digests.items():
            if hmac.compare_digest(given, digest):
                found = name
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def operators(cfg: Config, started_by: str) -> Operators:
    """The operators' tokens from `[console] operators_file`, or one made for `started_by`."""
    path = cfg.console.operators_file
    if path is None:
        token = secrets.token_urlsafe(24)
        return Operators({started_by: _digest(token)}, (started_by, token))
    p = beside(cfg, path)
    try:
        if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"[console] operators_file {p} may be read by others (mode "
                              f"{stat.S_IMODE(p.stat().st_mode):o})", hint=f"chmod 600 {p}")
        data = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"[console] operators_file {p} cannot be read: {type(exc).__name__}",
                          hint='Write one line per operator: name = "token" (at least 16 characters).') from exc
    bad = [name for name, token in data.items() if not isinstance(token, str) or len(token) < MIN_TOKEN]
    if bad or not data:
        raise ConfigError(f"[console] operators_file {p}: " + (f"the tokens of {', '.join(bad)} are not strings of "
                                                               f"{MIN_TOKEN} characters or more" if bad else
                                                               "no operator"),
                          hint='Write one line per operator: name = "token" (e.g. from `openssl rand -hex 24`).')
    tokens = [str(t) for t in data.values()]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"[console] operators_file {p}: two operators share a token; the audit could not tell "
                          "them apart", hint="Give each operator a token of their own.")
    return Operators.of({str(name): str(token) for name, token in data.items()})


def beside(cfg: Config, path: str) -> Path:
    """A file the configuration names: a relative path is relative to the configuration file's directory."""
    p = Path(path)
    return cfg.path.resolve().parent / p if cfg.path is not None and not p.is_absolute() else p


class Throttle:
    """Failed token attempts per client address: how long the next answer waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, address: str) -> float:
        with self._lock:
            count, last = self._failures.get(address, (0, 0.0))
            if time.monotonic() - last > FORGET_AFTER:
                count = 0
            count += 1
            self._failures[address] = (count, time.monotonic())
        return min(FIRST_DELAY * 2 ** (count - 1), MAX_DELAY)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_listen(cfg: Config, listen: str, insecure: bool) -> str | None:
    """Refuse an address beyond loopback without TLS unless `insecure`; the warning to print when it is allowed so."""
    host, _ = split_listen(listen)
    tls = bool(cfg.console.tls_certfile and cfg.console.tls_keyfile)
    if bool(cfg.console.tls_certfile) != bool(cfg.console.tls_keyfile):
        raise ConfigError("[console] tls_certfile and tls_keyfile go together",
                          hint="Give both (the certificate and its key), or neither.")
    if is_loopback(host) or tls:
        return None
    if not insecure:
        raise ConfigError(f"the console would listen on {listen}, beyond this host, without TLS: anyone on the "
                          "network could watch, and read the tokens operators send",
                          hint="Give [console] tls_certfile and tls_keyfile, listen on 127.0.0.1 (and reach it "
                               "through an SSH tunnel), or pass --insecure on a network you trust.")
    return (f"WARNING: the console listens on {listen} without TLS (--insecure): operator tokens cross the network "
            "in clear text")
