"""Bearer tokens: a file of token hashes, each naming a tenant and (optionally) the RPCs it may call.

    # --auth-token-file: one token per line; '#' starts a comment
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  team-a
    sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752  team-b  Generate,CountTokens

`visionchat-server hash-token` (or `printf %s TOKEN | sha256sum`) gives a token's line. The file holds
no secret: a leaked file does not let anyone call. It is re-read when it changes, so tokens are added
and revoked without a restart. Every presented token is compared with every entry in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("visionchat.auth")
RECHECK_SECONDS = 1.0
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # also a metrics label value: short and plain
RPCS = ("Chat", "Generate", "CountTokens", "GetModelInfo", "Reflection")


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the line."""


@dataclass(frozen=True)
class Tenant:
    name: str
    rpcs: frozenset[str] | None  # None: every RPC

    def may_call(self, rpc: str) -> bool:
        return self.rpcs is None or rpc in self.rpcs


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_file(text: str, where: str = "token file") -> list[tuple[bytes, Tenant]]:
    entries: list[tuple[bytes, Tenant]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise TokenFileError(f"{where}:{number}: expected 'sha256:<hex> <tenant> [RPC,RPC...]'")
        digest, name = parts[0], parts[1]
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise TokenFileError(f"{where}:{number}: the first field must be sha256: and 64 lowercase hex digits")
        if not TENANT.match(name):
            raise TokenFileError(f"{where}:{number}: tenant {name!r} must be 1-63 of A-Z a-z 0-9 _ . - (not first)")
        rpcs = None
        if len(parts) == 3:
            rpcs = frozenset(parts[2].split(","))
            unknown = sorted(rpcs - set(RPCS))
            if unknown:
                raise TokenFileError(f"{where}:{number}: unknown RPCs {unknown}; known: {', '.join(RPCS)}")
        entries.append((bytes.fromhex(digest.removeprefix("sha256:")), Tenant(name, rpcs)))
    return entries


class TokenTable:
    """The tenants of a token file, current with the file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._signature = self._stat()
        self._entries = parse_token_file(self._read(), str(self.path))
        if not self._entries:
            raise TokenFileError(f"{self.path}: no tokens (every call would be refused)")

    def _stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TokenFileError(f"cannot read the token file: {exc}") from exc
        return st.st_mtime_ns, st.st_size

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read the token file: {exc}") from exc

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < RECHECK_SECONDS:
            return
        self._checked_at = now
        try:
            signature = self._stat()
            if signature != self._signature:
                self._entries = parse_token_file(self._read(), str(self.path))
                self._signature = signature
                log.info("token file reloaded: %d tokens", len(self._entries))
        except TokenFileError as exc:
            log.error("token file changed but cannot be used (keeping the previous tokens): %s", exc)

    def tenant(self, token: str) -> Tenant | None:
        """The token's tenant, or None; every entry is compared, in constant time."""
        with self._lock:
            self._refresh()
            entries = self._entries
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for expected, tenant in entries:
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found
