# syntax=docker/dockerfile:1
# One image for the forklift API and workers.
#   docker build -t forklift .
#   docker run forklift                      -> the API (uvicorn on :8000)
#   docker run forklift celery -A worker.app worker --pool=prefork --loglevel=INFO
# docker-compose.yml runs both (and redis) with the settings wired up.

# Builder: the full Python image has the compilers, should a dependency need building for
# this platform. It turns the project and all its dependencies into wheels.
FROM python:3.11 AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
RUN pip wheel --wheel-dir /wheels .

# Final: slim Python, no compilers; installs only the wheels, from the builder, offline.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app
RUN groupadd --system --gid 10001 forklift \
    && useradd --system --uid 10001 --gid forklift --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin forklift \
    && mkdir -p /app \
    && chown forklift:forklift /app
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels forklift
# Job modules of your own (FORKLIFT_JOB_MODULES) can be mounted under /app: it is on PYTHONPATH.
WORKDIR /app
USER forklift:forklift
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
