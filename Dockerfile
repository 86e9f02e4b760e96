# One image for every process of the gateway (API, workers, Flower, migrations): the command picks.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package is built from (the build context also holds .venv/, .git/, .state/...).
COPY pyproject.toml README.md ./
COPY api ./api
COPY common ./common
COPY launcher ./launcher
COPY migrations ./migrations
COPY workers ./workers
RUN pip install . && rm -rf /app/build /app/*.egg-info

# Not root: Celery warns about it, and nothing here needs it.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin gateway
USER gateway

EXPOSE 8080 5555
CMD ["llm-gateway", "api", "--host", "0.0.0.0", "--port", "8080"]
