"""The ``llm-gateway keys`` command line (arguments only: no imports of the service, so ``--help``
stays fast). What each subcommand does is in :mod:`launcher.keys`."""

from __future__ import annotations

import argparse


def _key_fields(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    parser.add_argument("--name", required=creating)
    parser.add_argument("--role", choices=("client", "admin"), default=None,
                        help="admin keys may also call /admin/ (default client)")
    parser.add_argument("--models", default=None,
                        help="comma-separated model aliases or globs it may call, e.g. 'gpt-4o*,fake-model'"
                        + ("" if creating else "; 'all' lifts the scope"))
    parser.add_argument("--expires", default=None,
                        help="a duration (90d, 12h, 30m) or an RFC 3339 time"
                        + ("" if creating else "; 'never' removes the expiry"))
    parser.add_argument("--team", default=None, help="the team it belongs to" + (
        "" if creating else "; 'none' removes it"))
    parser.add_argument("--limits", default=None,
                        help="its own limits, 'concurrency=1,rpm=60' (also tpm, rpd, tpd) or JSON"
                        + ("" if creating else "; 'default' returns to the YAML key_limits"))
    parser.add_argument("--metadata", default=None, help="a JSON object")
    if creating:
        parser.add_argument("--budget", action="append", default=None, metavar="PERIOD:usd=N,tokens=N",
                            help="a budget of the key (repeatable): daily, weekly, monthly or lifetime; "
                            "usd=, tokens= or both; name= (default: the period), e.g. daily:usd=5")


def add_keys_commands(keys: argparse.ArgumentParser) -> None:
    actions = keys.add_subparsers(dest="action", required=True)
    _key_fields(actions.add_parser("create", help="create a key (its secret is printed once)"), creating=True)
    listing = actions.add_parser("list", help="list keys in creation order")
    listing.add_argument("--limit", type=int, default=200)
    listing.add_argument("--after", default=None, help="continue after this key id")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    actions.add_parser("get", help="show one key as JSON").add_argument("key_id")
    update = actions.add_parser("update", help="change a key")
    update.add_argument("key_id")
    _key_fields(update, creating=False)
    actions.add_parser("revoke", help="revoke a key").add_argument("key_id")
