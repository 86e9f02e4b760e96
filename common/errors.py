"""The gateway's error hierarchy. Every error a client can see is one of these.

    GatewayError                        status, type, code, message (+ retry_after, param)
    ├── InvalidRequest            400   malformed JSON, missing or ill-typed fields
    │   └── ExceedsLimit          400   the call alone is larger than a limit allows (it could never start)
    ├── AuthenticationFailed      401   missing, unknown or revoked API key
    ├── BudgetExceeded            402   the call's worst case does not fit a budget (never a 429: waiting
    │                                   does not free a budget); names the budget, spent, limit, reset
    ├── PermissionDenied          403   a valid key that may not do this (a client key on /admin/)
    ├── NotFound                  404   unknown job id, unknown route
    │   └── ModelNotFound         404   the model alias is not in the registry
    ├── JobConflict               409   e.g. cancelling a job that already runs
    │   └── JobCancelled          409   the job was cancelled before it produced an answer
    ├── RequestTimeout            408   the body did not arrive within GATEWAY_CLIENT_TIMEOUT
    ├── PayloadTooLarge           413   body above GATEWAY_MAX_BODY_BYTES
    ├── IdempotencyConflict       422   an Idempotency-Key reused with a different body
    ├── QueueTimeout              429   the job waited its max_wait in line; it was withdrawn
    ├── ClientGone                499   the caller disconnected; the upstream call was aborted
    ├── InternalError             500   a bug; logged with its traceback, never shown
    ├── ServiceUnavailable        503   a part of the gateway itself is down; retry after Retry-After
    │   ├── ProviderUnavailable   503   the model's provider is not routable (no credentials)
    │   ├── QueueUnavailable      503   Redis (the queue) is unreachable: nothing was queued
    │   ├── StoreUnavailable      503   Postgres is unreachable: nothing was recorded
    │   ├── OutcomeUnknown        503   the gateway lost track of a call that may have run (job id given)
    │   └── GatewayStopping       503   the API process is stopping: the held call was withdrawn, never ran
    ├── JobTimeout                504   the job did not finish within the task time limit
    └── UpstreamError                   something the upstream provider said or did
        ├── UpstreamRejected      4xx   the provider refused the request; its status and message pass through
        ├── UpstreamRateLimited   429   the provider's own 429, with its Retry-After
        ├── UpstreamUnavailable   502   5xx or a broken connection
        │   ├── UpstreamCredentialsRejected 502  401/403 from the provider: the operator's key is wrong
        │   ├── UpstreamBadResponse 502  a 200 that is not an answer (an error body, no choices)
        │   └── UpstreamStreamBroken 502 the stream broke off after chunks went out (never retried)
        └── UpstreamTimeout       504   no answer within the provider's timeout

Adapters raise the ``Upstream*`` errors; the API renders any ``GatewayError`` in the caller's own
protocol's error shape. Errors cross from worker to API as :meth:`GatewayError.to_dict` and come back
as the same class with :meth:`GatewayError.from_dict` (every subclass is found by name).
"""


from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    # status and code are the class's defaults; one error may carry its own (``__init__``), so they are
    # instance attributes, not ClassVars. The type is fixed per class.
    status: int = 500
    type: ClassVar[str] = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else type(self).status
        self.code = code if code is not None else type(self).code
        self.retry_after = retry_after
        self.param = param

    #: the job this error is about, if one was created (answered as ``x-gateway-job-id``)
    job_id: str | None = None

    def headers(self) -> dict[str, str]:
        """Extra response headers this error carries (besides ``Retry-After``)."""
        return {"x-gateway-job-id": self.job_id} if self.job_id else {}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "message": self.message, "status": self.status,
                "code": self.code, "retry_after": self.retry_after, "param": self.param}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> GatewayError:
        cls = _BY_NAME.get(str(data.get("kind")), GatewayError)
        return cls(str(data.get("message", "error")), status=data.get("status"), code=data.get("code"),
                   retry_after=data.get("retry_after"), param=data.get("param"))


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"


class JobConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "job_not_cancellable"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BudgetExceeded(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"

    #: the budget's id and when it resets (answered as ``x-gateway-budget-id`` / ``-resets-at``)
    budget_id: str | None = None
    resets_at: str | None = None

    def headers(self) -> dict[str, str]:
        extra = {"x-gateway-budget-id": self.budget_id, "x-gateway-budget-resets-at": self.resets_at}
        return {**super().headers(), **{k: v for k, v in extra.items() if v}}


class QueueTimeout(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_timeout"


class ExceedsLimit(InvalidRequest):
    code = "request_exceeds_limit"


class JobCancelled(JobConflict):
    code = "job_cancelled"


class IdempotencyConflict(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class ClientGone(GatewayError):
    status = 499
    type = "client_closed"
    code = "client_closed"


class InternalError(GatewayError):
    status = 500
    type = "api_error"
    code = "internal_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class ProviderUnavailable(ServiceUnavailable):
    code = "provider_not_configured"


class QueueUnavailable(ServiceUnavailable):
    code = "queue_unavailable"


class StoreUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class GatewayStopping(ServiceUnavailable):
    """The API process holding the call is stopping (SIGTERM) and its drain time passed before the
    call could start: it was withdrawn — it never ran and never will — so a retry is safe."""

    code = "gateway_stopping"


class OutcomeUnknown(ServiceUnavailable):
    """The gateway lost track of an accepted call (its live state is gone, or Redis stayed down past
    the call's deadline): the call may or may not have run. Never says "retry it" and carries no
    ``Retry-After``: a blind retry may run the call twice. Carries the job id (``x-gateway-job-id``)."""

    code = "outcome_unknown"

    @classmethod
    def for_job(cls, job_id: str, why: str) -> OutcomeUnknown:
        error = cls(f"the outcome of job {job_id} is unknown: {why}. The call may or may not have run "
                    "(and been billed); a retry may run it again unless it is sent with the same "
                    "Idempotency-Key while the gateway still holds that key's outcome")
        error.job_id = job_id
        return error


class JobTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "job_timeout"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class UpstreamRejected(UpstreamError):
    status = 400
    type = "invalid_request_error"
    code = "upstream_rejected"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"


class UpstreamUnavailable(UpstreamError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class UpstreamCredentialsRejected(UpstreamUnavailable):
    code = "upstream_auth_failed"


class UpstreamBadResponse(UpstreamUnavailable):
    code = "upstream_bad_response"


class UpstreamStreamBroken(UpstreamUnavailable):
    code = "upstream_stream_broken"


def _subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


_BY_NAME: dict[str, type[GatewayError]] = {cls.__name__: cls for cls in _subclasses(GatewayError)}
