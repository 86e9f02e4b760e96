"""``llm-gateway`` — the operator's entry point.

    llm-gateway up        the whole system (embedded Redis/Postgres when no URLs are set)
    llm-gateway api       the HTTP front end (gunicorn + gevent)
    llm-gateway worker    one Celery worker pool for one provider queue (llm.<provider>)
    llm-gateway flower    the queue dashboard
    llm-gateway migrate   alembic upgrade head
    llm-gateway keys      create / list / get / update / revoke API keys
    llm-gateway usage     usage and cost from the rollups (what GET /admin/usage reports), JSON or CSV
    llm-gateway providers which providers are routable, and why not
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from common.settings import Settings, SettingsError, load_settings
from launcher.discovery import StoresNotFound, resolve_stores, store_environment
from launcher.keyargs import add_keys_commands

#: The stores each command needs. A URL the environment leaves unset is taken from the running
#: ``llm-gateway up`` of the state directory (launcher/discovery.py); a command not listed needs none.
STORES_NEEDED: dict[str, tuple[str, ...]] = {
    "api": ("redis", "postgres"),
    "worker": ("redis", "postgres"),
    "flower": ("redis",),
    "migrate": ("postgres",),
    "keys": ("postgres",),
    "usage": ("postgres",),
}


def _exec(argv: list[str], settings: Settings) -> None:
    """Replace this process by ``argv``, passing on the store URLs it was resolved with."""
    os.execve(argv[0], argv, store_environment(os.environ, settings.redis_url, settings.database_url))


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (inherited across exec): each held request and
    each in-flight upstream call is a socket, and the common soft default of 1024 would make the
    1,025th fail with EMFILE. Returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    raise_fd_limit()
    argv = [
        sys.executable, "-m", "gunicorn",
        # gunicorn's gevent worker + a deadline for a new connection's headers and errors in JSON
        "--worker-class", "api.gunicorn_worker.GatewayWorker",
        "--workers", str(args.workers),
        "--worker-connections", str(args.connections),
        # --port 0: the OS picks a free port; gunicorn logs it ("Listening at: …") — how tests avoid races
        "--bind", f"{args.host or settings.api_host}:{settings.api_port if args.port is None else args.port}",
        # SIGTERM / Ctrl-C: held callers get the drain time (api/gunicorn_worker.py), then 2 s to be answered
        "--graceful-timeout", f"{settings.drain_timeout + 2:g}",
        "--config", "python:api.gunicorn_worker",  # its on_starting hook: Ctrl-C stops gracefully too
        "--keep-alive", "75",
        # gunicorn's defaults, stated: a longer request line → 414, more or longer headers → 431 (JSON)
        "--limit-request-line", "4094", "--limit-request-fields", "100", "--limit-request-field_size", "8190",
        "--no-control-socket",  # one fixed path per user: several APIs on a machine would fight over it
        *(["--access-logfile", "-"] if args.access_log else []),  # formatting lines for /dev/null costs ~5%
        "api.wsgi:app",
    ]
    _exec(argv, settings)
    return 0  # pragma: no cover - execv does not return


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    raise_fd_limit()
    _exec(worker_argv(settings, args), settings)
    return 0  # pragma: no cover


def worker_argv(settings: Settings, args: argparse.Namespace) -> list[str]:
    """The ``celery worker`` command line for one provider's queue."""
    provider = settings.registry.providers.get(args.provider)
    if provider is None:
        known = ", ".join(settings.registry.providers)
        raise SystemExit(f"unknown provider {args.provider!r}; known: {known}")
    return [
        sys.executable, "-m", "celery", "-A", "workers.worker:app", "worker",
        "--queues", settings.queue_for(provider.name),
        "--pool", "gevent",
        "--concurrency", str(args.concurrency or provider.pool),
        "--hostname", f"{provider.name}-{args.name or os.getpid()}@%h",
        "--prefetch-multiplier", "1",
        *(["--task-events"] if settings.task_events else []),
        "--without-mingle", "--without-gossip",
        "--loglevel", args.loglevel,
    ]


def cmd_flower(settings: Settings, args: argparse.Namespace) -> int:
    _exec(flower_argv(settings, args), settings)
    return 0  # pragma: no cover


def flower_argv(settings: Settings, args: argparse.Namespace) -> list[str]:
    """The ``celery flower`` command line. With task events off Flower must not turn them on: by
    default it broadcasts ``enable_events`` to the workers every few seconds, which made
    ``GATEWAY_TASK_EVENTS=off`` a no-op under ``up`` (docs/benchmarks.md, issue 14)."""
    address = "0.0.0.0" if args.public else "127.0.0.1"
    return [sys.executable, "-m", "celery", "-A", "workers.worker:app", "flower",
            f"--port={args.port or settings.flower_port}", f"--address={address}",
            *([] if settings.task_events else ["--enable_events=False"])]


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from common.db import migrate

    assert settings.database_url is not None  # resolved by main() (STORES_NEEDED)
    migrate(settings.database_url)
    print("database schema is at head")
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """The admin API's key operations from a shell, through the same service (common/apikeys.py)."""
    from launcher.keys import run_keys

    assert settings.database_url is not None  # resolved by main() (STORES_NEEDED)
    try:  # Redis too, when at hand: a change then reaches every API process within a second
        settings = resolve_stores(settings, ("redis",))
    except StoresNotFound:
        pass  # without it the API processes see the change at their next periodic reload (5 s)
    return run_keys(settings, args)


def cmd_usage(settings: Settings, args: argparse.Namespace) -> int:
    """``GET /admin/usage`` without the API: the same parameters, the same service code."""
    import json
    from datetime import UTC, datetime

    from common.db import make_session_factory
    from common.errors import InvalidRequest
    from common.usage import as_csv, as_json, parse_query, report

    assert settings.database_url is not None  # resolved by main() (STORES_NEEDED)
    params = {"from": args.since, "to": args.until, "group_by": args.group_by, "key": args.key,
              "model": args.model, "provider": args.provider, "format": "csv" if args.csv else "json"}
    try:
        query = parse_query({k: v for k, v in params.items() if v}, datetime.now(UTC))
    except InvalidRequest as exc:
        raise SystemExit(f"llm-gateway usage: {exc.message}") from None
    result = report(make_session_factory(settings.database_url, pool_size=1), query)
    print(as_csv(result) if args.csv else json.dumps(as_json(result), indent=2), end="" if args.csv else "\n")
    return 0


def cmd_providers(settings: Settings, args: argparse.Namespace) -> int:
    """Each provider: routable or why not, and — when Redis is reachable (its URL, or a running
    ``up``) — how its upstream answered over the last minutes, as ``GET /health`` shows it."""
    upstream = _recent_upstream(settings)
    for name, p in settings.registry.providers.items():
        status = "routable" if p.routable else f"NOT routable: {p.unroutable_reason}"
        recent = f"\t{describe_upstream(upstream[name])}" if name in upstream else ""
        print(f"{name}\t{p.kind}\t{status}{recent}")
    return 0


def _recent_upstream(settings: Settings) -> dict[str, dict[str, Any]]:
    import redis

    from common.upstream_health import UpstreamHealth

    try:
        settings = resolve_stores(settings, ("redis",))
    except StoresNotFound:
        print("(recent upstream errors: shown while `llm-gateway up` runs here, or with REDIS_URL set)",
              file=sys.stderr)
        return {}
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return UpstreamHealth(client, settings.key_prefix).snapshot(settings.routable_providers())
    except redis.RedisError as exc:
        print(f"(recent upstream errors unavailable: Redis: {exc})", file=sys.stderr)
        return {}
    finally:
        client.close()


def describe_upstream(entry: dict[str, Any]) -> str:
    """One provider's recent upstream record (``UpstreamHealth.snapshot``) in a few words."""
    text = (f"upstream {entry['status']} ({entry['attempts']} calls, {entry['errors']} errors in "
            f"{entry['window_s'] // 60} min")
    last = entry.get("last_error")
    if last:
        text += f"; last error {last['seconds_ago']:g} s ago: {last['status_class']}: {last['message']}"
    return text + ")"


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from launcher.supervisor import run_up

    return run_up(settings, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run everything (embedded Redis/Postgres if REDIS_URL/DATABASE_URL unset)")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None)
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the HTTP API under gunicorn+gevent")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.add_argument("--workers", type=int, default=1, help="gunicorn processes (default 1)")
    api.add_argument("--connections", type=int, default=10000, help="held connections per process")
    api.add_argument("--access-log", action="store_true")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a Celery worker for one provider queue")
    worker.add_argument("--provider", required=True)
    worker.add_argument("--concurrency", type=int, default=None, help="default: the provider's pool")
    worker.add_argument("--name", default=None, help="node name suffix (default: pid)")
    worker.add_argument("--loglevel", default="warning")
    worker.set_defaults(func=cmd_worker)

    flower = sub.add_parser("flower", help="run the Flower dashboard")
    flower.add_argument("--port", type=int, default=None)
    flower.add_argument("--public", action="store_true", help="listen on all interfaces")
    flower.set_defaults(func=cmd_flower)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("providers", help="show which providers are routable").set_defaults(func=cmd_providers)

    keys = sub.add_parser("keys", help="manage API keys (as the admin API does)")
    add_keys_commands(keys)
    keys.set_defaults(func=cmd_keys)

    usage = sub.add_parser("usage", help="usage and cost per key/model/provider/day/hour (README: Usage)")
    usage.add_argument("--from", dest="since", help="RFC 3339 (default: the start of this UTC month)")
    usage.add_argument("--to", dest="until", help="RFC 3339 (default: now)")
    usage.add_argument("--group-by", help="comma-separated: day, hour, key, model, provider")
    usage.add_argument("--key", help="only these key ids (comma-separated)")
    usage.add_argument("--model", help="only these model aliases")
    usage.add_argument("--provider", help="only these providers")
    usage.add_argument("--csv", action="store_true", help="CSV instead of JSON")
    usage.set_defaults(func=cmd_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except (SettingsError, ValueError) as exc:
        print(f"llm-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        settings = resolve_stores(settings, STORES_NEEDED.get(args.command, ()))
    except StoresNotFound as exc:
        print(f"llm-gateway {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(settings, args)
    except _unreachable_store_errors() as exc:  # a URL that leads nowhere: one line, not a traceback
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        store = "Redis" if type(exc).__module__.startswith("redis") else "Postgres"
        print(f"llm-gateway {args.command}: cannot reach {store}: {first_line}", file=sys.stderr)
        return 1


def _unreachable_store_errors() -> tuple[type[BaseException], ...]:
    """What a command raises when a store's URL leads nowhere (their messages name host and port,
    never the password)."""
    import redis
    from sqlalchemy.exc import OperationalError

    return (redis.ConnectionError, redis.TimeoutError, OperationalError)


if __name__ == "__main__":
    sys.exit(main())
