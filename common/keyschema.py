"""What an API key carries, validated: the admin API's request bodies (:class:`KeyCreate`,
:class:`KeyUpdate`), the record every API process caches per key (:class:`KeyRecord`) and the rules
it answers (expired? may it call this model?). Pure: no I/O; ``common/apikeys.py`` stores them.

A key carries:

* ``role`` — ``client`` (calls models) or ``admin`` (may also call ``/admin/...``);
* ``allowed_models`` — model aliases or globs (``gpt-4o*``, ``fake-?``, ``[ab]-model``); null: all;
* ``expires_at`` — RFC 3339 with a timezone; past it the key gets 401 (``key_expired``);
* ``metadata`` — a free JSON object of at most :data:`METADATA_MAX_BYTES` bytes;
* ``limits`` — the key's own ``concurrency``/``rpm``/``tpm``/``rpd``/``tpd`` (as ``key_limits`` in the
  YAML registry, which stays the default for keys that set none); null: that default;
* ``team`` — a name that groups keys (team budgets use it); null: none;
* ``budgets`` — its spend caps (:class:`common.budgets.BudgetTerms`: name, period, limit_usd and/or
  limit_tokens, thresholds), stored as budgets of scope ``key`` (``common/keybudgets.py``). On update
  the list *replaces* the key's set, matched by name: a name kept keeps its budget (id, spend, alerts)
  with the new terms, a new name is a new budget, a name left out is deleted; ``[]`` deletes them all;
  the field left out leaves them as they are.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.budgets import BudgetTerms
from common.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from common.registry import Limits

Role = Literal["client", "admin"]
ROLES: tuple[str, ...] = ("client", "admin")
METADATA_MAX_BYTES = 4096
MAX_ALLOWED_MODELS = 100
MAX_KEY_BUDGETS = 20
# an alias or a glob over aliases: what registry aliases are made of, plus the glob characters
_PATTERN = re.compile(r"^[A-Za-z0-9._:/@+\-*?\[\]!]{1,200}$")
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# a validator's message may start with the field it is about ("limit_usd: needs ..."): see parse_body
_NAMED = re.compile(r"^([A-Za-z_\[][\w.\[\]]*): (.+)$", re.DOTALL)


def model_allowed(patterns: tuple[str, ...] | None, alias: str) -> bool:
    """Whether a key scoped to ``patterns`` (None: unscoped) may call the model ``alias``. Globs are
    shell-style and case-sensitive, like aliases (``fnmatchcase``): ``gpt-4o*`` allows ``gpt-4o`` and
    ``gpt-4o-mini``, not ``GPT-4o``."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(alias, pattern) for pattern in patterns)


class _Fields(BaseModel):
    """The fields a key body may set (create and update share their rules). Unknown fields are a 400
    naming them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", min_length=1, max_length=200)
    role: Role = "client"
    allowed_models: list[str] | None = Field(default=None, max_length=MAX_ALLOWED_MODELS)
    expires_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    limits: Limits | None = None
    team: str | None = Field(default=None, min_length=1, max_length=100)
    budgets: list[BudgetTerms] | None = Field(default=None, max_length=MAX_KEY_BUDGETS)

    @field_validator("budgets")
    @classmethod
    def _unique_names(cls, value: list[BudgetTerms] | None) -> list[BudgetTerms] | None:
        seen: set[str] = set()
        for index, terms in enumerate(value or ()):
            if terms.name in seen:   # a PATCH matches budgets by name
                raise ValueError(f"[{index}].name: {terms.name!r} is given twice; a key's budgets have "
                                 "different names")
            seen.add(terms.name)
        return value

    @field_validator("allowed_models")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or ():
            if not _PATTERN.match(pattern):
                raise ValueError(f"{pattern!r} is not a model alias or glob (letters, digits, ._:/@+- and "
                                 "the glob characters *?[]!, at most 200)")
        return None if value is None else list(dict.fromkeys(value))

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a timezone, e.g. 2030-01-01T00:00:00Z")
        return value

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"is {size} bytes of JSON; at most {METADATA_MAX_BYTES}")
        return value

    @field_validator("limits")
    @classmethod
    def _some_limit(cls, value: Limits | None) -> Limits | None:
        return value if value is not None and value.any else None   # {} means "the default"


_F = TypeVar("_F", bound=_Fields)


class KeyCreate(_Fields):
    name: str = Field(min_length=1, max_length=200)

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError("is in the past; a new key must expire in the future")
        return value


class KeyUpdate(_Fields):
    """Only the fields present are changed; ``null`` clears ``allowed_models`` (all models),
    ``expires_at`` (never), ``limits`` (the YAML default) and ``team``; ``budgets`` replaces the key's
    set (``[]``: none) and may not be null."""

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}

    @field_validator("name", "role", "metadata", "budgets", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may not be null")
        return value


def parse_body(model: type[_F], body: Any) -> _F:
    """``body`` validated as ``model``; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = field_path(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "is not a field of " + ("an API key" if len(first["loc"]) == 1 else "a budget")
        elif named := _NAMED.match(message):
            inner, message = named.groups()
            field = field + ("" if inner.startswith("[") or not field else ".") + inner
        raise InvalidRequest(f"{field}: {message}" if field else message, param=field or None) from None


def field_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as the caller wrote it: ``budgets[0].period``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def parse_expiry(text: str, now: datetime) -> datetime:
    """``--expires`` of the CLI: a duration from now (``90d``, ``12h``, ``30m``, ``2w``, ``45s``) or an
    RFC 3339 time with a timezone."""
    duration = _DURATION.match(text.strip())
    if duration:
        return now + timedelta(seconds=int(duration.group(1)) * _UNIT_S[duration.group(2)])
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"expires: {text!r} is neither a duration (90d, 12h) nor an RFC 3339 time",
                             param="expires_at") from None
    if when.tzinfo is None:
        raise InvalidRequest("expires: give a timezone (e.g. 2030-01-01T00:00:00Z)", param="expires_at")
    return when


@dataclass(frozen=True)
class KeyRecord:
    """A key as every API process caches it (by the SHA-256 of its secret)."""

    id: str
    role: str = "client"
    allowed_models: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    limits: Limits | None = None
    team: str | None = None
    revoked: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def check_usable(self, now: datetime) -> None:
        """Raise 401 if the key was revoked or has expired."""
        if self.revoked:
            raise AuthenticationFailed("this API key was revoked", code="key_revoked")
        if self.expires_at is not None and self.expires_at <= now:
            raise AuthenticationFailed(f"this API key expired at {self.expires_at.isoformat()}",
                                       code="key_expired")

    def check_model(self, alias: str) -> None:
        """Raise 403 if the key may not call the model ``alias``."""
        if not model_allowed(self.allowed_models, alias):
            raise PermissionDenied(f"this API key may not use the model '{alias}'", param="model",
                                   code="model_not_allowed")
