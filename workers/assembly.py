"""Building a worker process's :class:`~workers.runner.JobRunner` from settings: its Redis pool,
adapters, stores and the background threads every worker runs (usage flusher, reconciler, the
admission heartbeat). Called once per process (``workers/worker.py``, ``workers/tasks.py``)."""

from __future__ import annotations

import os
import socket

import redis

from common.apikeys import KeyService
from common.budgetrows import BudgetRows
from common.db import make_session_factory
from common.jobrows import JobRows
from common.jobs import JobStore
from common.limits import Limiter
from common.revoked import RevokedKeys
from common.settings import Settings
from workers.adapters.base import build_adapter, make_http_session
from workers.admission import AdmissionControl
from workers.budget_alerts import AlertDispatcher
from workers.reconciler import JobReconciler
from workers.runner import JobRunner, job_lease_ttl
from workers.usage import UsageFlusher, UsageLedger

REDIS_CONNECTIONS = 64  # per worker process (two are held: the wake subscription and the usage reader)


def build_runner(settings: Settings) -> JobRunner:
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("workers need REDIS_URL and DATABASE_URL")
    # bounded: a worker may hold thousands of jobs (waiting in line, or relaying streams) and each
    # needs a connection only for one short command at a time; an unbounded pool grew one per job
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=REDIS_CONNECTIONS,
                                                 timeout=30, health_check_interval=30)
    client = redis.Redis(connection_pool=pool)
    adapters = {name: build_adapter(p, make_http_session(p.pool))
                for name, p in settings.registry.providers.items() if p.routable}
    store = JobStore(client, settings.key_prefix)
    sessions = make_session_factory(settings.database_url)
    ledger = UsageLedger(sessions)
    rows = JobRows(sessions)
    UsageFlusher(store, ledger, consumer=f"{socket.gethostname()}:{os.getpid()}").start()
    JobReconciler(settings, store, rows).start()
    AlertDispatcher(settings, client, settings.key_prefix, BudgetRows(sessions),
                    consumer=f"{socket.gethostname()}:{os.getpid()}").start()
    lease_ttl = job_lease_ttl(settings)
    # keyed: any key may be given limits of its own at any time (the admin API)
    limiter = Limiter(store, keyed=True)
    admission = AdmissionControl(limiter, call_lease_s=lease_ttl)
    admission.start()  # the process heartbeat: the jobs this process holds (``holder``) are alive with it
    keys = KeyService(sessions, client, settings.key_prefix)
    return JobRunner(settings, store, rows, ledger, adapters, admission,
                     revoked=RevokedKeys(keys.revoked_ids, keys.version))
