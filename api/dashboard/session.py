"""The dashboard's session: a signed cookie naming the admin who logged in (never the admin secret).

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page can send it, which
is what keeps the dashboard's forms safe from cross-site requests) and Secure when served over HTTPS.
It is signed (itsdangerous, HMAC-SHA1 over a derived key) with ``GATEWAY_DASHBOARD_SECRET``, or with a
secret generated once into ``<state dir>/dashboard_secret`` (mode 0600) — shared by every API process
of a machine; several machines need the env var. Sessions last :data:`MAX_AGE_S`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "gw_dashboard"
MAX_AGE_S = 12 * 3600


def signing_secret(configured: str | None, state_dir: Path) -> str:
    """``configured`` if set, else the state dir's generated secret (created on first use)."""
    if configured:
        return configured
    path = state_dir / "dashboard_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two API processes starting together agree on whichever wrote first
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


class Sessions:
    """Issue and read session tokens: ``issue(admin_id)`` → cookie value; ``read(value)`` → admin id or
    None (missing, forged or older than :data:`MAX_AGE_S`)."""

    def __init__(self, secret: str) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt="llm-gateway-dashboard")

    def issue(self, admin_id: str) -> str:
        return self._signer.dumps({"admin": admin_id})

    def read(self, value: str | None) -> str | None:
        if not value:
            return None
        try:
            data = self._signer.loads(value, max_age=MAX_AGE_S)
        except BadSignature:  # also SignatureExpired, its subclass
            return None
        admin = data.get("admin") if isinstance(data, dict) else None
        return admin if isinstance(admin, str) else None
