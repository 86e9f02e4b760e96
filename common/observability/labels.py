"""Bounded metric labels: every value a label can take comes from a finite set the operator controls
(the registry's providers and aliases, our error codes, HTTP status classes), never from what a caller
sent. A junk model name, a made-up path or an unknown error collapses to ``OTHER``: a scraper's memory
(and ours — every label set is a series kept for the process's life) cannot be grown from outside.

Pure functions, no I/O (tested by ``tests/unit/test_metric_labels.py``).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import cache

from common.errors import GatewayError

OTHER = "other"     # what any value outside a label's known set becomes
NONE = "none"       # the label does not apply (e.g. a request that named no model)
_KEY_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

#: HTTP status → its class; anything outside 100..599 is not an HTTP status we sent
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def bounded(value: str | None, known: Collection[str]) -> str:
    """``value`` if it is one of ``known``; ``NONE`` if absent; else ``OTHER``."""
    if not value:
        return NONE
    return value if value in known else OTHER


def status_class(status: int) -> str:
    """``2xx``/``4xx``/... for an HTTP status; ``other`` for anything that is not one."""
    if not 100 <= status <= 599:
        return OTHER
    return _STATUS_CLASSES[status // 100]


@cache
def error_codes() -> frozenset[str]:
    """Every ``code`` our error hierarchy (``common/errors.py``) can carry: the set an error label is
    bounded by. Computed once: the hierarchy is fixed at import."""
    codes: set[str] = set()
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        cls = pending.pop()
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code:
            codes.add(code)
        pending.extend(cls.__subclasses__())
    return frozenset(codes)


def error_label(error: GatewayError | None) -> str:
    """An error's code if our hierarchy defines it, else its class's (an instance may carry a code of
    its own, e.g. an upstream's), else ``other``; ``none`` for no error."""
    if error is None:
        return NONE
    known = error_codes()
    for code in (error.code, type(error).code):
        if code in known:
            return str(code)
    return OTHER


def key_label(key_id: str | None, opted_in: bool) -> str | None:
    """The API key's id as a label value, only if the operator opted in (GATEWAY_METRICS_KEY_LABELS):
    one series per key is the operator's choice to pay for. None when not opted in (no per-key series).
    Key ids are ours (``key_…``, ``anonymous``); anything else shaped oddly collapses to ``other``."""
    if not opted_in:
        return None
    if not key_id:
        return NONE
    return key_id if _KEY_ID.match(key_id) else OTHER
