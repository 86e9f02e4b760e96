"""Async jobs: ``POST /v1/jobs`` (202), ``GET /v1/jobs/<id>``, ``DELETE /v1/jobs/<id>``.

The body of ``POST /v1/jobs`` is exactly a Chat Completions body; the finished job's ``result`` is
the ChatCompletion.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, Response, g, jsonify, url_for

from api.requests import admit, gateway, idempotency, json_body
from common.contract import JobState
from common.db import Job
from common.protocols.openai import parse_chat_request

bp = Blueprint("jobs", __name__)


@bp.post("/v1/jobs")
def create_job() -> tuple[Response, int]:
    body = json_body()
    idem = idempotency(body)
    chat, extensions = parse_chat_request(body)
    call = admit(chat, extensions.get("max_wait"), gateway().settings.async_max_wait)
    job, new = call.gw.submit(chat, call.route, max_wait=call.max_wait,
                              max_cost=call.max_cost, api_key_id=g.api_key_id, idem=idem)
    response = jsonify(render_job(job))
    response.headers["Location"] = url_for("jobs.get_job", job_id=job.id)
    if not new:  # a repeat under an Idempotency-Key: the first call's job as it is now
        response.headers["Idempotent-Replayed"] = "true"
        return response, 200
    return response, 202


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    gw = gateway()
    job = gw.job(job_id, g.api_key_id)
    body = render_job(job)
    if job.status == JobState.QUEUED:
        body["queue"] = gw.position(job)
    return jsonify(body)


@bp.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    return jsonify(render_job(gateway().cancel(job_id, g.api_key_id)))


def render_job(job: Job) -> dict[str, Any]:
    timestamps = {JobState.QUEUED.value: _iso(job.created_at), JobState.RUNNING.value: _iso(job.started_at)}
    if job.finished_at is not None:
        timestamps[job.status] = _iso(job.finished_at)
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "model": job.model,
        "provider": job.provider,
        "created_at": int(job.created_at.timestamp()),
        "timestamps": {k: v for k, v in timestamps.items() if v is not None},
        "deadline_at": _iso(job.deadline_at),
        "attempts": job.attempts,
        "result": job.result,
        "error": job.error,
        "usage": job.usage,
        "urls": {"self": url_for("jobs.get_job", job_id=job.id),
                 "cancel": url_for("jobs.cancel_job", job_id=job.id)},
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
