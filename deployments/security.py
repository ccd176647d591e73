"""API keys of the ingress: HTTP `Authorization: Bearer KEY`, gRPC metadata `authorization:
Bearer KEY` (or `x-api-key: KEY`).

Keys come from the config (`ServiceOptions.api_keys`) and from an environment variable of the
Router's process (`ServiceOptions.api_keys_env`, comma-separated), so they can stay out of
config files. No key configured = no authentication.

The check is constant-time: the presented key and every configured key are hashed to SHA-256
digests (equal lengths: the key's length does not leak either) and compared with
`hmac.compare_digest`, against ALL keys, without stopping at a match.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Optional


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str] = (), env: Optional[str] = None):
        found = [k.strip() for k in keys if k and k.strip()]
        if env and os.environ.get(env):
            found += [k.strip() for k in os.environ[env].split(",") if k.strip()]
        self._digests = [_digest(k) for k in found]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def check(self, presented: Optional[str]) -> bool:
        """True when no key is required, or `presented` is one of the keys."""
        if not self._digests:
            return True
        d = _digest(presented or "")
        ok = False
        for want in self._digests:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(d, want)
        return ok and bool(presented)


def bearer(value: Optional[str]) -> Optional[str]:
    """The KEY of `Bearer KEY` (case-insensitive scheme), else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def http_key(headers) -> Optional[str]:
    return bearer(headers.get("authorization")) or headers.get("x-api-key")


def grpc_key(metadata: Optional[Iterable[tuple[str, str]]]) -> Optional[str]:
    md = {k.lower(): v for k, v in (metadata or ())}
    return bearer(md.get("authorization")) or md.get("x-api-key")
