"""Passwords: every password of the configured DSNs is registered here, and `redact` removes passwords from any text
that may hold a DSN (by pattern, also from malformed DSNs, and literally, wherever a registered one appears).

`migrator.config` registers the passwords of the file, the environment and every `Config` it builds, and re-exports
`redact`, `register_secret` and `passwords_in`, the names the rest of migrator uses.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_secrets: tuple[str, ...] = ()
"""Passwords of the configured DSNs, longest first; replaced whole (never mutated, so redact() may run anywhere)."""
_MIN_SECRET = 3
"""Shorter pieces are not replaced literally (they would blank out ordinary words); the patterns still apply."""

_URI_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]*@")
"""user:password@ of a URI, up to the LAST @ of the token: an unescaped @ in a password does not end it early."""
_KV_PASSWORD = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+(?:[ \t]+(?![A-Za-z_][\w.-]*\s*=)\S+)*)", re.IGNORECASE)
"""password=value (also PGPASSWORD=, sslpassword=): a quoted value with escapes, or an unquoted one running on over
spaces up to the next key=, as a malformed DSN's value does."""


def register_secret(value: str) -> None:
    """Replace `value` (and the pieces a parser would cut it into) wherever redact() sees it."""
    global _secrets
    pieces = {p.strip() for p in (value, unquote(value), *re.split(r"[\s@]+", value))}
    new = {p for p in pieces if len(p) >= _MIN_SECRET} - set(_secrets)
    if new:
        _secrets = tuple(sorted({*_secrets, *new}, key=len, reverse=True))


def passwords_in(text: str) -> list[str]:
    """Every password in a DSN as written, read leniently (malformed DSNs included)."""
    found = []
    for m in re.finditer(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        rest = text[m.end():]
        at = rest.rfind("@")
        userinfo = rest[:at] if at >= 0 else ""
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    for m in re.finditer(r"password\s*=\s*", text, re.IGNORECASE):
        rest = text[m.end():]
        if rest.startswith("'"):
            value, i = [], 1
            while i < len(rest) and rest[i] != "'":
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                value.append(rest[i])
                i += 1
            found.append("".join(value))
        else:
            end = re.search(r"\s+[A-Za-z_][\w.-]*\s*=|[&#]|$", rest)
            found.append(rest[: end.start() if end else len(rest)])
    return [p for p in found if p]


def redact(text: str) -> str:
    """Remove passwords from anything that may contain a DSN (a URI or key=value form, well-formed or not)."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)
