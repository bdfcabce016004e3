# syntax=docker/dockerfile:1
#
# relay gateway image. The same image runs the orchestrator simulation
# (`docker run IMAGE simulate --forever`) and every other subcommand.
#
#   docker build -t relay:latest .
#   docker run --rm -p 8000:8000 -e RELAY_REDIS_URL=redis://HOST:6379/0 relay:latest

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- builder
# Builds the wheel and installs it with its dependencies into a virtualenv;
# only the virtualenv is copied into the final image.
FROM python:${PYTHON_VERSION}-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/relay

# README.md* matches nothing rather than failing when the readme is absent.
COPY pyproject.toml README.md* ./
COPY relay ./relay

RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/relay/bin/pip install /wheels/relay-*.whl \
 && /opt/relay/bin/pip uninstall --yes pip setuptools wheel \
 && find /opt/relay -name '__pycache__' -prune -exec rm -rf {} +

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="Redis-backed distributed event relay for AI agent platforms"

RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin relay

COPY --from=builder /opt/relay /opt/relay
COPY config.toml /etc/relay/config.toml

# Listen on every interface inside the container; the port stays 8000
# unless RELAY_GATEWAY_PORT says otherwise (the health check follows it).
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_GATEWAY_HOST=0.0.0.0

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# SIGTERM closes every WebSocket with 1012 and drains for up to
# gateway.drain_timeout (8 s): give the container a longer stop timeout.
STOPSIGNAL SIGTERM

# Liveness only (the process serves HTTP); readiness is /readyz, which the
# load balancer checks. slim has no curl, so ask Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_GATEWAY_PORT', '8000'), timeout=2)"]

ENTRYPOINT ["relay"]
CMD ["gateway", "--config", "/etc/relay/config.toml"]
