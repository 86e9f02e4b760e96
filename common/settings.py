"""Typed settings, read from the environment once at start-up.

This is the only module that looks at the environment. Everything else receives a
:class:`Settings` (or the piece of it it needs) from whoever built it: ``create_app(settings)``,
``make_celery(settings)``, the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.registry import Registry, load_registry

DEFAULT_REGISTRY = Path(__file__).with_name("default_registry.yaml")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable and what it expects."""


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    return int(_float(env, name, default, minimum=minimum))


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "on", "true", "yes"):
        return True
    if raw.lower() in ("0", "off", "false", "no"):
        return False
    raise SettingsError(f"{name}={raw!r} must be on or off")


def normalise_database_url(url: str) -> str:
    """SQLAlchemy needs the driver named; accept the ecosystem's plain ``postgres(ql)://`` too."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


@dataclass(frozen=True)
class Settings:
    """Everything the gateway's processes need to know, resolved and validated."""

    redis_url: str | None
    database_url: str | None
    registry: Registry
    key_prefix: str = "gw"
    default_max_wait: float = 60.0          # seconds a sync call may wait in line before its 429
    max_wait_limit: float = 3600.0          # the largest per-request max_wait we accept
    async_max_wait: float = 86400.0         # async jobs wait in line up to this long
    task_time_limit: float = 600.0          # hard limit on one job's run (upstream call + retries)
    reconcile_interval: float = 30.0        # how often workers look for async jobs Redis lost
    task_events: bool = True                # Celery task events: Flower's task views need them
    breakers: bool = True                   # per-deployment circuit breakers (common/routing/breaker.py)
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 64                # arrays/objects nested deeper than this: 400
    client_timeout: float = 10.0            # a new connection's headers, and any body, arrive within this
    drain_timeout: float = 8.0              # on SIGTERM: running calls and held callers get this long
    auth_stale_limit: float = 300.0         # Postgres down: keys checked against the last good set this long
    auth_mode: str = "auto"                 # auto | required | off
    # GATEWAY_ADMIN_KEY: the bearer secret of /admin/ (None: only admin-role keys); never in a repr
    admin_key: str | None = field(default=None, repr=False)
    state_dir: Path = field(default_factory=lambda: Path(".state"))
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    flower_port: int = 5555
    visibility_timeout_override: float | None = None
    # budget alerts: a signed POST (Standard Webhooks) to this URL when a soft threshold is crossed
    budget_webhook_url: str | None = None
    budget_webhook_secret: str | None = field(default=None, repr=False)
    budget_webhook_attempts: int = 5                 # tries per alert, backing off 0.5 s, 1 s, 2 s, ...

    @property
    def visibility_timeout(self) -> float:
        """A reserved message is redelivered only after this long: it must outlast any job's
        longest legitimate run so that a slow job is never executed twice."""
        if self.visibility_timeout_override is not None:
            return self.visibility_timeout_override
        return self.max_wait_limit + self.task_time_limit + 60.0

    def routable_providers(self) -> list[str]:
        """Providers that have what they need (credentials, base URL) to take calls."""
        return [name for name, p in self.registry.providers.items() if p.routable]

    def queue_for(self, provider: str) -> str:
        """The Celery queue name (what workers consume, what Flower shows)."""
        return f"llm.{provider}"

    def queue_key(self, provider: str) -> str:
        """The Redis list that holds that queue's messages (kombu's ``global_keyprefix`` + name)."""
        return f"{self.key_prefix}:{self.queue_for(provider)}"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (the process environment by default)."""
    env = os.environ if env is None else env
    config_path = Path(env.get("GATEWAY_CONFIG") or DEFAULT_REGISTRY)
    registry = load_registry(config_path, env)
    auth_mode = env.get("GATEWAY_AUTH", "auto")
    if auth_mode not in ("auto", "required", "off"):
        raise SettingsError(f"GATEWAY_AUTH={auth_mode!r} must be one of auto, required, off")
    database_url = env.get("DATABASE_URL") or None
    visibility = env.get("GATEWAY_VISIBILITY_TIMEOUT")
    settings = Settings(
        redis_url=env.get("REDIS_URL") or None,
        database_url=normalise_database_url(database_url) if database_url else None,
        registry=registry,
        key_prefix=env.get("GATEWAY_KEY_PREFIX", "gw"),
        default_max_wait=_float(env, "GATEWAY_MAX_WAIT", 60.0, minimum=0.1),
        max_wait_limit=_float(env, "GATEWAY_MAX_WAIT_LIMIT", 3600.0, minimum=0.1),
        async_max_wait=_float(env, "GATEWAY_ASYNC_MAX_WAIT", 86400.0, minimum=1.0),
        task_time_limit=_float(env, "GATEWAY_TASK_TIME_LIMIT", 600.0, minimum=1.0),
        reconcile_interval=_float(env, "GATEWAY_RECONCILE_INTERVAL", 30.0, minimum=0.5),
        task_events=_flag(env, "GATEWAY_TASK_EVENTS", True),
        breakers=_flag(env, "GATEWAY_BREAKERS", True),
        max_body_bytes=_int(env, "GATEWAY_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024),
        max_json_depth=_int(env, "GATEWAY_MAX_JSON_DEPTH", 64, minimum=8),
        client_timeout=_float(env, "GATEWAY_CLIENT_TIMEOUT", 10.0, minimum=0.1),
        drain_timeout=_float(env, "GATEWAY_DRAIN_TIMEOUT", 8.0, minimum=0.0),
        auth_stale_limit=_float(env, "GATEWAY_AUTH_STALE_LIMIT", 300.0),
        auth_mode=auth_mode,
        admin_key=env.get("GATEWAY_ADMIN_KEY") or None,
        state_dir=Path(env.get("GATEWAY_STATE_DIR", ".state")),
        api_host=env.get("GATEWAY_HOST", "127.0.0.1"),
        api_port=_int(env, "GATEWAY_PORT", 8080, minimum=1),
        flower_port=_int(env, "GATEWAY_FLOWER_PORT", 5555, minimum=1),
        visibility_timeout_override=float(visibility) if visibility else None,
        budget_webhook_url=env.get("GATEWAY_BUDGET_WEBHOOK_URL") or None,
        budget_webhook_secret=env.get("GATEWAY_BUDGET_WEBHOOK_SECRET") or None,
        budget_webhook_attempts=_int(env, "GATEWAY_BUDGET_WEBHOOK_ATTEMPTS", 5, minimum=1),
    )
    if settings.budget_webhook_url and not settings.budget_webhook_secret:
        raise SettingsError("GATEWAY_BUDGET_WEBHOOK_URL needs GATEWAY_BUDGET_WEBHOOK_SECRET (its key)")
    if settings.default_max_wait > settings.max_wait_limit:
        raise SettingsError("GATEWAY_MAX_WAIT must not exceed GATEWAY_MAX_WAIT_LIMIT")
    return settings
