"""Who may use `clipsql serve`: named secrets from a file or the environment, never the command line.

A credentials file (`clipsql serve STORE --auth FILE`) or the variable CLIPSQL_SERVE_TOKENS holds
one `name:secret` entry per line (in the variable, entries may also be separated by commas);
blank lines and lines starting with `#` are ignored. A client proves it holds a secret either

* as a password: user `name`, password `secret` (HTTP Basic; Flight SQL's username/password
  login, which the server answers with a session token the client then sends as a bearer token), or
* as a token: `Authorization: Bearer secret`.

Secrets are compared in constant time (`hmac.compare_digest`, against every entry). Without any
credentials the server refuses to start, unless asked for anonymous access (`--allow-anonymous`),
which is accepted only on a loopback address (127.0.0.1, ::1, localhost).

`Auth.authenticate(header)` is the one check both endpoints use (the SQL endpoint and the app):
it takes the request's `Authorization` header (or None) and returns an `Identity`, or raises
AuthError with one line.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from clipsql.errors import AuthError, ServeError

ENV_TOKENS = "CLIPSQL_SERVE_TOKENS"
MIN_SECRET_CHARS = 12
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 10_000
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,100}$")


@dataclass(frozen=True)
class Identity:
    user: str
    anonymous: bool = False


ANONYMOUS = Identity("anonymous", anonymous=True)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_entries(text: str, where: str, *, commas: bool = False) -> dict[str, str]:
    """`name:secret` entries → {name: secret}; a malformed entry is refused naming its line."""
    out: dict[str, str] = {}
    lines = text.replace(",", "\n").splitlines() if commas else text.splitlines()
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        name, secret = name.strip(), secret.strip()
        if not sep or not _NAME.match(name) or not secret or any(c.isspace() for c in secret):
            raise ServeError(f"{where}, entry {i}: expected `name:secret` (a name of letters, digits and _.@+-, "
                             "a secret without spaces)")
        if len(secret) < MIN_SECRET_CHARS:
            raise ServeError(f"{where}, entry {i} ({name}): the secret is shorter than {MIN_SECRET_CHARS} "
                             "characters; make one with "
                             "`python -c \"import secrets; print(secrets.token_urlsafe())\"`")
        if name in out:
            raise ServeError(f"{where}: {name} appears twice")
        out[name] = secret
    return out


class Auth:
    """Named secrets + the session tokens handed out after a password login."""

    def __init__(self, entries: dict[str, str], *, allow_anonymous: bool = False,
                 session_ttl_s: float = SESSION_TTL_S):
        self._entries = [(name, secret.encode()) for name, secret in sorted(entries.items())]
        self.allow_anonymous = allow_anonymous
        self.session_ttl_s = session_ttl_s
        self._sessions: dict[str, tuple[Identity, float]] = {}
        self._lock = threading.Lock()

    @property
    def users(self) -> list[str]:
        return [name for name, _ in self._entries]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, host: str = "127.0.0.1",
             allow_anonymous: bool = False, environ: dict | None = None, warn=None) -> "Auth":  # noqa: ANN001
        """Credentials from `path` (a file) or else $CLIPSQL_SERVE_TOKENS; anonymous access only when
        asked for and `host` is a loopback address; no credentials and no anonymous → refused."""
        environ = os.environ if environ is None else environ
        entries: dict[str, str] = {}
        if path is not None:
            p = Path(path)
            try:
                text = p.read_text()
            except OSError as e:
                raise ServeError(f"cannot read the credentials file {p}: {e.strerror or e}") from None
            entries = parse_entries(text, str(p))
            if not entries:
                raise ServeError(f"the credentials file {p} holds no `name:secret` entry")
            mode = p.stat().st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH) and warn is not None:
                warn(f"the credentials file {p} is readable by other users: chmod 600 {p}")
        elif environ.get(ENV_TOKENS, "").strip():
            entries = parse_entries(environ[ENV_TOKENS], f"${ENV_TOKENS}", commas=True)
        if allow_anonymous and not is_loopback(host):
            raise ServeError(f"anonymous access is allowed only on a loopback address (127.0.0.1, ::1), not on "
                             f"{host}: give credentials with --auth FILE or ${ENV_TOKENS}")
        if not entries and not allow_anonymous:
            raise ServeError(f"clipsql serve needs credentials: --auth FILE (lines `name:secret`) or ${ENV_TOKENS}"
                             " (never on the command line); or, on 127.0.0.1 only, --allow-anonymous")
        return cls(entries, allow_anonymous=allow_anonymous)

    # -- checks -----------------------------------------------------------------------------
    def check_password(self, user: str, password: str) -> Identity:
        given = password.encode()
        found = None
        for name, secret in self._entries:        # every entry, constant time each
            if hmac.compare_digest(secret, given) & hmac.compare_digest(name.encode(), user.encode()):
                found = name
        if found is None:
            raise AuthError("wrong user name or password")
        return Identity(found)

    def check_token(self, token: str) -> Identity:
        given = token.encode()
        found = None
        for name, secret in self._entries:
            if hmac.compare_digest(secret, given):
                found = name
        if found is not None:
            return Identity(found)
        now = time.monotonic()
        with self._lock:
            hit = self._sessions.get(token)
            if hit is not None and hit[1] > now:
                return hit[0]
            if hit is not None:
                del self._sessions[token]
        raise AuthError("invalid or expired token: log in again")

    def issue_token(self, who: Identity) -> str:
        """A session token for `who` (after a password login), valid for `session_ttl_s`."""
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions = {t: v for t, v in self._sessions.items() if v[1] > now}
                while len(self._sessions) >= MAX_SESSIONS:
                    self._sessions.pop(next(iter(self._sessions)))
            self._sessions[token] = (who, now + self.session_ttl_s)
        return token

    def authenticate(self, header: str | None) -> tuple[Identity, str | None]:
        """An `Authorization` header (or None) → (who, a new session token to hand back after a
        password login, else None). Raises AuthError with one line."""
        if not header:
            if self.allow_anonymous:
                return ANONYMOUS, None
            raise AuthError("this server needs credentials: a user name and password, or a token")
        scheme, _, value = header.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            return self.check_token(value), None
        if scheme == "basic" and value:
            try:
                padded = value + "=" * (-len(value) % 4)      # Go clients send it unpadded
                user, sep, password = base64.b64decode(padded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError("malformed Basic credentials") from None
            if not sep:
                raise AuthError("malformed Basic credentials")
            who = self.check_password(user, password)
            return who, self.issue_token(who)
        raise AuthError("unsupported Authorization header: send `Basic` (user name and password) or `Bearer` "
                        "(token)")
