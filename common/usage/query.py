"""What a usage report asks for, read from a request's parameters (pure: no I/O).

Parameters (``GET /v1/usage``, ``GET /admin/usage``, the CLI):

``from``, ``to``  RFC 3339 (``2026-11-01T00:00:00Z``, an offset, or a bare date for its 00:00 UTC). The
                  report covers every hour that overlaps ``[from, to)`` — the rollups' grain is the
                  UTC hour, so ``from`` is floored and ``to`` ceiled to whole hours, and the answer says
                  which window it covers. Default: ``from`` the start of the current UTC month, ``to``
                  now (so the current hour is included). ``to`` must be after ``from``, at most
                  :data:`MAX_RANGE` later.
``group_by``      comma-separated, any of :data:`GROUPS` (none: one total over the window).
``key``, ``model``, ``provider``  filters, comma-separated values (``key`` on the admin API only).
``format``        ``json`` (default) or ``csv``.

Every mistake is an :class:`~common.errors.InvalidRequest` naming the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from common.errors import InvalidRequest

#: what a report may be grouped by, in the order its columns and rows come
GROUPS = ("day", "hour", "key", "model", "provider")
#: filters and the values they match: ``key`` (the admin API only), ``model`` (alias), ``provider``
FILTERS = ("key", "model", "provider")
FORMATS = ("json", "csv")
MAX_RANGE = timedelta(days=366)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MAX_FILTER_VALUES = 100

# RFC 3339 date-time (or a bare full-date). A ' ' where the offset's sign belongs is a '+' that a query
# string decoded as a space (``?from=2026-11-01T00:00:00+01:00`` sent unencoded): read it as '+'.
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})"
                      r"(?:[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+\- ])(\d{2}):(\d{2})))?")


@dataclass(frozen=True)
class UsageQuery:
    """A report's window (``since`` < ``until``, both whole UTC hours), grouping and filters (an empty
    filter matches everything)."""

    since: datetime
    until: datetime
    group_by: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    format: str = "json"


def parse_time(raw: str, param: str) -> datetime:
    """An RFC 3339 timestamp (or a bare date: 00:00 UTC) as an aware UTC datetime; 400 naming ``param``
    otherwise."""
    match = _RFC3339.fullmatch(raw.strip())
    if match is None:
        raise InvalidRequest(f"'{param}' must be an RFC 3339 timestamp such as 2026-11-01T00:00:00Z "
                             f"(or a date, 2026-11-01), not {raw[:64]!r}", param=param)
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        if hour is None:
            return datetime(int(year), int(month), int(day), tzinfo=UTC)
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        offset = timedelta(0) if zulu else timedelta(hours=int(off_h), minutes=int(off_m))
        if offset >= DAY:
            raise ValueError("offset of a day or more")
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), min(int(second), 59),
                         micro, tzinfo=UTC)
        return local - offset if sign in (None, "+", " ") else local + offset
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"'{param}' is not a valid time ({exc}): {raw[:64]!r}", param=param) from None


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(moment: datetime) -> datetime:
    floored = floor_hour(moment)
    return floored if floored == moment else floored + HOUR


def month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _list(args: Mapping[str, str], name: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.strip() for v in args.get(name, "").split(",") if v.strip()))
    if len(values) > MAX_FILTER_VALUES:
        raise InvalidRequest(f"'{name}' takes at most {MAX_FILTER_VALUES} values", param=name)
    return values


def parse_query(args: Mapping[str, str], now: datetime, *, filters: Collection[str] = FILTERS) -> UsageQuery:
    """The report ``args`` ask for (see the module's docstring); ``filters``: the filter parameters this
    caller may use. Unknown parameters are refused (a misspelt ``group_by`` must not silently give a
    total)."""
    known = {"from", "to", "group_by", "format", *filters}
    for name in args:
        if name not in known:
            hint = (" (/v1/usage reports the calling key only; /admin/usage takes 'key')"
                    if name == "key" else "")
            raise InvalidRequest(f"unknown parameter '{name}'{hint}; this report takes: "
                                 f"{', '.join(sorted(known))}", param=name)
    since = parse_time(args["from"], "from") if args.get("from") else month_start(now)
    until = parse_time(args["to"], "to") if args.get("to") else now
    if until <= since:
        raise InvalidRequest(f"'to' ({until:%Y-%m-%dT%H:%M:%SZ}) must be after 'from' "
                             f"({since:%Y-%m-%dT%H:%M:%SZ})", param="to")
    if until - since > MAX_RANGE:
        raise InvalidRequest(f"'from' to 'to' spans more than {MAX_RANGE.days} days; ask for less at once",
                             param="to")
    group_by = _list(args, "group_by")
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        raise InvalidRequest(f"'group_by' takes {', '.join(GROUPS)} (comma-separated), not "
                             f"{', '.join(repr(g[:40]) for g in unknown)}", param="group_by")
    fmt = args.get("format", "json") or "json"
    if fmt not in FORMATS:
        raise InvalidRequest(f"'format' is one of {', '.join(FORMATS)}, not {fmt[:40]!r}", param="format")
    return UsageQuery(since=floor_hour(since), until=ceil_hour(until),
                      group_by=tuple(g for g in GROUPS if g in group_by),
                      keys=_list(args, "key"), models=_list(args, "model"), providers=_list(args, "provider"),
                      format=fmt)


def plan(since: datetime, until: datetime, *, hourly_only: bool) -> tuple[list[tuple[datetime, datetime]],
                                                                          list[tuple[datetime, datetime]]]:
    """Which rollup answers which part of ``[since, until)`` (whole hours): ``(daily, hourly)`` lists of
    half-open ranges. Whole UTC days come from the daily rollup (24 times fewer rows to read), the hours
    at either end from the hourly one; everything from the hourly one when grouping by hour."""
    first_day = since.replace(hour=0)
    if first_day < since:
        first_day += DAY
    last_day = until.replace(hour=0)
    if hourly_only or first_day >= last_day:
        return [], [(since, until)]
    hourly = [(lo, hi) for lo, hi in ((since, first_day), (last_day, until)) if lo < hi]
    return [(first_day, last_day)], hourly
