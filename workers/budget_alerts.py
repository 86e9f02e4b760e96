"""Budget alerts: a soft threshold crossed (``budget.lua`` puts it on the stream ``P:budget:alerts`` in
the step that charged the spend) becomes one structured log line, one ``budget_alerts`` row and — with
``GATEWAY_BUDGET_WEBHOOK_URL`` set — one signed webhook POST (``common/webhooks.py``), retried with
backoff, every attempt recorded on the row.

Once per budget, period and threshold: the Lua fires each threshold once per period hash, and the row's
unique constraint holds even if Redis forgot that it fired (a rebuilt hash fires again; the row refuses
it). Every worker process runs an :class:`AlertDispatcher` in the consumer group ``alerts``; an entry is
acked once its row is written and its delivery has ended, and entries a dead worker read are claimed
after ``CLAIM_IDLE_MS`` (its row then refuses the second copy: a POST in flight when a worker died is
not retried — it stays ``pending`` on the row).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, cast

import redis
import requests
from sqlalchemy.exc import SQLAlchemyError

from common import webhooks
from common.budgetrows import BudgetRows
from common.budgets import usd_text
from common.errors import NotFound
from common.settings import Settings
from workers.periodic import Periodic

log = logging.getLogger(__name__)

GROUP = "alerts"
CLAIM_IDLE_MS = 60_000
FIRST_BACKOFF_S = 0.5
WEBHOOK_TIMEOUT_S = 5.0


class AlertDispatcher(Periodic):
    name = "budget-alerts"
    retry_on = (OSError, redis.RedisError, SQLAlchemyError)

    def __init__(self, settings: Settings, client: redis.Redis, prefix: str, rows: BudgetRows, consumer: str,
                 *, interval: float = 0.5, http: requests.Session | None = None) -> None:
        super().__init__(interval)
        self.settings = settings
        self.redis = client
        self.key = f"{prefix}:budget:alerts"
        self.rows = rows
        self.consumer = consumer
        self.http = http or requests.Session()
        self._grouped = False

    def tick(self) -> int:
        """Handle the alerts waiting on the stream; returns how many."""
        if not self._grouped:
            try:
                self.redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._grouped = True
        claimed = self.redis.xautoclaim(self.key, GROUP, self.consumer, CLAIM_IDLE_MS, count=20)[1]
        fresh = cast(list[Any], self.redis.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=20))
        entries = list(cast(list[Any], claimed)) + [e for _, batch in fresh for e in batch]
        for entry_id, fields in entries:
            if fields:
                self.handle({k.decode(): v.decode() for k, v in fields.items()})
            self.redis.xack(self.key, GROUP, entry_id)
            self.redis.xdel(self.key, entry_id)
        return len(entries)

    def handle(self, fields: dict[str, str]) -> str | None:
        """One fired threshold: its row (unless it fired already), its log line, its webhook."""
        budget_id, tag = fields["budget"].rsplit(":", 2)[-2:]
        period_start = datetime.fromtimestamp(int(tag), UTC)
        threshold = int(fields["pct"])
        try:
            name: str | None = self.rows.get(budget_id).name
        except NotFound:
            name = None
        limit, tlimit = int(fields["limit"]), int(fields["tlimit"])
        payload: dict[str, Any] = {
            "type": "budget.threshold_crossed", "timestamp": datetime.now(UTC).isoformat(),
            "data": {"budget_id": budget_id, "name": name, "threshold_percent": threshold,
                     "period_start": period_start.isoformat(),
                     "spent_usd": usd_text(int(fields["spent"])),
                     "limit_usd": usd_text(limit) if limit >= 0 else None,
                     "spent_tokens": int(fields["tspent"]), "limit_tokens": tlimit if tlimit >= 0 else None}}
        webhook = bool(self.settings.budget_webhook_url)
        alert_id = self.rows.record_alert(budget_id, period_start, threshold, payload, webhook=webhook)
        if alert_id is None:
            return None  # fired already this period
        line = {"event": "budget_alert", "alert_id": alert_id, **payload["data"]}
        log.warning("budget alert %s", json.dumps(line))
        if webhook:
            self.deliver(alert_id, payload)
        return alert_id

    def deliver(self, alert_id: str, payload: dict[str, Any]) -> bool:
        """POST the alert, signed, until a 2xx or the attempts run out (backing off, doubling)."""
        url, secret = self.settings.budget_webhook_url, self.settings.budget_webhook_secret
        assert url is not None and secret is not None
        body = json.dumps(payload, separators=(",", ":")).encode()
        attempts = self.settings.budget_webhook_attempts
        delay = FIRST_BACKOFF_S
        for attempt in range(1, attempts + 1):
            status: int | None = None
            error: str | None = None
            try:
                response = self.http.post(url, data=body, timeout=WEBHOOK_TIMEOUT_S,
                                          headers=webhooks.headers(secret, alert_id, int(time.time()), body))
                status = response.status_code
            except requests.RequestException as exc:
                error = type(exc).__name__
            ok = status is not None and 200 <= status < 300
            last = ok or attempt == attempts
            self.rows.delivery_attempt(alert_id, status=status, error=error,
                                       done=("delivered" if ok else "failed") if last else None)
            if ok:
                return True
            if not last:
                time.sleep(delay)
                delay *= 2
        log.warning("budget alert %s: webhook not delivered after %d attempts", alert_id, attempts)
        return False
