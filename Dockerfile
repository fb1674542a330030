# syntax=docker/dockerfile:1
# fal-gateway-proxy: keep the fal key server-side, forward fal SDK calls through
# Cloudflare AI Gateway. Build:  docker build -t fal-gateway-proxy .
# Try:    docker run --rm -p 8787:8787 fal-gateway-proxy demo   then open http://127.0.0.1:8787/
#         (the offline demo: no account, no key; it listens on FAL_PROXY_HOST, 0.0.0.0 here)
# Run:    docker run --rm -p 8787:8787 -e FAL_KEY=... -e CF_ACCOUNT_ID=... -e CF_GATEWAY_ID=... \
#           -e FAL_PROXY_AUTH=token -e FAL_PROXY_CLIENT_TOKENS_FILE=/run/secrets/tokens \
#           -v ./client-tokens:/run/secrets/tokens:ro fal-gateway-proxy
# It listens on 0.0.0.0, so it refuses to start with FAL_PROXY_AUTH=none (the default) unless
# FAL_PROXY_ALLOW_UNAUTHENTICATED=true says something in front authenticates callers; that
# opt-in is deliberately not set here. /metrics on FAL_PROXY_METRICS_PORT listens on
# 127.0.0.1 unless FAL_PROXY_METRICS_HOST says otherwise.

# ---- builder: turn the project and every dependency into wheels -------------------------
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# [tracing]: OpenTelemetry over OTLP/HTTP, used only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[tracing]'

# ---- final: the wheels only, no compilers, no source tree --------------------------------
FROM python:3.11-slim
# The wheels were resolved together in the builder, so installing exactly them is pinned.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin proxy
ENV FAL_PROXY_HOST=0.0.0.0 FAL_PROXY_PORT=8787 FAL_PROXY_LOG_FORMAT=json \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8787
# The proxy drains in-flight requests on SIGTERM and exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["fal-gateway-proxy"]
