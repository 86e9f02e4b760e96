"""Entry point for ``gunicorn api.wsgi:app`` (what ``llm-gateway api`` runs)."""

from api.app import create_app
from common.settings import load_settings

app = create_app(load_settings())
