"""The gateway's error hierarchy. Every error a client can see is one of these.

    GatewayError                      status, type, code, message (+ retry_after)
    ├── InvalidRequest          400   malformed JSON, missing or ill-typed fields
    ├── AuthenticationFailed    401   missing, unknown or revoked API key
    ├── NotFound                404   unknown job id, unknown route
    │   └── ModelNotFound       404   the model alias is not in the registry
    ├── JobConflict             409   e.g. cancelling a job that already runs
    ├── PayloadTooLarge         413   body above GATEWAY_MAX_BODY_BYTES
    ├── QueueTimeout            429   the job waited its max_wait in line; it was withdrawn
    ├── ProviderUnavailable     503   the model's provider is not routable (no credentials)
    └── UpstreamError                 something the upstream provider said or did
        ├── UpstreamRejected    4xx   the provider refused the request; its status and message pass through
        ├── UpstreamRateLimited 429   the provider's own 429, with its Retry-After
        ├── UpstreamUnavailable 502   5xx or a broken connection
        └── UpstreamTimeout     504   no answer within the provider's timeout

Adapters raise the ``Upstream*`` errors; the API renders any ``GatewayError`` in the caller's own
protocol's error shape. Errors cross from worker to API as :meth:`GatewayError.to_dict`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else type(self).status
        self.code = code if code is not None else type(self).code
        self.retry_after = retry_after
        self.param = param

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


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueTimeout(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_timeout"


class ProviderUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "provider_not_configured"


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


_BY_NAME: dict[str, type[GatewayError]] = {
    cls.__name__: cls
    for cls in (GatewayError, InvalidRequest, AuthenticationFailed, NotFound, ModelNotFound, JobConflict,
                PayloadTooLarge, QueueTimeout, ProviderUnavailable, UpstreamError, UpstreamRejected,
                UpstreamRateLimited, UpstreamUnavailable, UpstreamTimeout)
}
