"""Each blueprint answers every error raised in its routes in its own protocol's shape; the app
answers the rest in OpenAI's. Outages (Postgres, Redis) are 503 with Retry-After, never 500."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
import sqlalchemy.exc
from flask import Blueprint, Flask, abort
from werkzeug.exceptions import RequestEntityTooLarge

from api.errors import anthropic_document, install_error_handlers, ollama_document, openai_document
from common.errors import ModelNotFound


def raising(exc: BaseException) -> Callable[[], Any]:
    def view() -> Any:
        raise exc
    return view


RAISES: dict[str, Callable[[], Any]] = {
    "gateway": raising(ModelNotFound("no such model", param="model")),
    "not-found": lambda: abort(404),
    "too-large": raising(RequestEntityTooLarge()),
    "postgres": raising(sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))),
    "redis": raising(redis.ConnectionError("Connection refused")),
    "bug": raising(KeyError("oops")),
}
EXPECTED = {"gateway": (404, None), "not-found": (404, None), "too-large": (413, None),
            "postgres": (503, "2"),
            "redis": (503, "2"), "bug": (500, None)}


def openai_shaped(body: Any) -> bool:
    return set(body) == {"error"} and isinstance(body["error"], dict) and "code" in body["error"]


def anthropic_shaped(body: Any) -> bool:
    return body.get("type") == "error" and isinstance(body.get("error"), dict)


def ollama_shaped(body: Any) -> bool:
    return set(body) == {"error"} and isinstance(body["error"], str)


@pytest.fixture(scope="module")
def client():
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1024
    install_error_handlers(app, openai_document)
    for name, render in (("anthropic", anthropic_document), ("ollama", ollama_document),
                         ("openai", openai_document)):
        bp = Blueprint(name, __name__, url_prefix=f"/{name}")
        install_error_handlers(bp, render)
        for kind, raise_it in RAISES.items():
            bp.add_url_rule(f"/{kind}", f"{name}_{kind}", raise_it, methods=["POST"])
        app.register_blueprint(bp)
    for kind, raise_it in RAISES.items():
        app.add_url_rule(f"/plain/{kind}", f"plain_{kind}", raise_it, methods=["POST"])
    return app.test_client()


@pytest.mark.parametrize("kind", list(RAISES), ids=list(RAISES))
@pytest.mark.parametrize(("prefix", "shaped"), [("/anthropic", anthropic_shaped), ("/ollama", ollama_shaped),
                                                ("/openai", openai_shaped), ("/plain", openai_shaped)],
                         ids=["anthropic", "ollama", "openai", "no-blueprint"])
def test_errors_come_in_the_blueprints_shape(client, prefix, shaped, kind):
    r = client.post(f"{prefix}/{kind}")
    status, retry_after = EXPECTED[kind]
    assert r.status_code == status
    assert shaped(r.get_json()), r.get_json()
    assert r.headers.get("Retry-After") == retry_after
    assert "oops" not in r.get_data(as_text=True)  # a bug's details stay in the log


@pytest.mark.parametrize(("method", "path", "status"),
                         [("GET", "/anthropic/bug", 405), ("POST", "/nowhere", 404)],
                         ids=["wrong-method", "unknown-path"])
def test_routing_errors_belong_to_no_blueprint(client, method, path, status):
    r = client.open(path, method=method)
    assert r.status_code == status and openai_shaped(r.get_json())
