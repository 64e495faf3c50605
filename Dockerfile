# One image for the forklift API and workers.
#   docker build -t forklift .
#   docker run forklift                      -> the API (uvicorn on :8000)
#   docker run forklift celery -A worker.app worker --pool=prefork --loglevel=INFO
# docker-compose.yml runs both (and redis) with the settings wired up.
#
# No `# syntax=` line and no RUN --mount: the file builds with BuildKit's built-in frontend
# and with the classic builder alike (Compose v5 falls back to it where the buildx plugin is
# missing), without pulling a frontend image. The base images are build arguments, so a
# machine without a registry can use images of its own that behave like the official ones
# (compose: FORKLIFT_BUILDER_IMAGE, FORKLIFT_PYTHON_IMAGE).
ARG BUILDER_IMAGE=python:3.11
ARG PYTHON_IMAGE=python:3.11-slim

# Builder: the full Python image has the compilers, should a dependency need building for
# this platform. It installs the dependencies, at the versions of the lock (requirements.lock,
# the versions the tests pass with), under /deps, and the project under /forklift.
FROM ${BUILDER_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from pyproject.toml and the lock alone, so that these layers stay cached
# while only the code changes (the packages are not copied yet: the project's own wheel built
# here is empty, and is dropped).
COPY pyproject.toml requirements.lock ./
RUN touch README.md \
    && pip wheel --wheel-dir /wheels -c requirements.lock . \
    && rm /wheels/forklift-*.whl \
    && pip install --prefix=/deps --ignore-installed --no-deps --no-warn-script-location \
        /wheels/*.whl
COPY README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY forklift ./forklift
RUN pip wheel --no-deps --wheel-dir /dist . \
    && pip install --prefix=/forklift --ignore-installed --no-deps --no-warn-script-location \
        /dist/forklift-*.whl

# Final: slim Python, no compilers, no pip run: only what the builder installed.
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app
RUN groupadd --system --gid 10001 forklift \
    && useradd --system --uid 10001 --gid forklift --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin forklift \
    && mkdir -p /app \
    && chown forklift:forklift /app
COPY --from=builder /deps /usr/local
COPY --from=builder /forklift /usr/local
# Job modules of your own (FORKLIFT_JOB_MODULES) can be mounted under /app: it is on PYTHONPATH.
WORKDIR /app
USER forklift:forklift
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
