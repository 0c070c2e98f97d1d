# queuechat server image: `queuechat serve` with the grpc-web bridge and customer page, on PostgreSQL
# (the postgres extra) or SQLite in the data volume. docs/deploy.md has how to build and run it.

# --- build: the wheel, with the generated chat.v1 modules (scripts/gen) and the page bundle (scripts/build-web)
FROM python:3.11-slim AS build
# Node for the page bundle (esbuild, protoc-gen-es, which wants node 22): the official build from the node image.
COPY --from=node:22-slim /usr/local/bin/node /usr/local/bin/node
COPY --from=node:22-slim /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
# protoc (grpcio-tools) and google/rpc/error_details.proto (googleapis-common-protos), where the scripts look.
RUN python -m venv .venv && .venv/bin/pip install "grpcio-tools>=1.85" "googleapis-common-protos>=1.60"
COPY pyproject.toml README.md ./
COPY proto proto
COPY scripts/gen scripts/build-web scripts/
COPY server server
COPY clients clients
RUN scripts/gen && scripts/build-web && .venv/bin/pip wheel --no-deps -w /dist .

# --- runtime: the wheel with the postgres and cluster extras, as a user without privileges
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/queuechat/bin:$PATH \
    QUEUECHAT_DATA=/var/lib/queuechat \
    QUEUECHAT_LISTEN=[::]:50051 \
    QUEUECHAT_WEB_LISTEN=0.0.0.0:8080
COPY --from=build /dist/ /tmp/dist/
RUN python -m venv /opt/queuechat \
 && /opt/queuechat/bin/pip install "$(echo /tmp/dist/queuechat-*.whl)[postgres,cluster]" \
 && rm -rf /tmp/dist \
 && groupadd --system --gid 10001 queuechat \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/queuechat --create-home queuechat
# Numeric, so that a runtime can tell it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
WORKDIR /var/lib/queuechat
# SQLite (when no QUEUECHAT_DATABASE_URL is given) and attachments (files/) live here.
VOLUME ["/var/lib/queuechat"]
# gRPC (agents, integrators, admin), then the customer page and grpc-web bridge.
EXPOSE 50051 8080 9464
# grpc.health.v1 for "" (the whole server) on the port QUEUECHAT_LISTEN names.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = os.environ.get('QUEUECHAT_LISTEN', '[::]:50051').rpartition(':')[2]; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + port)).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["queuechat"]
# Mount the configuration file here (docs/configuration.md); secrets may come as QUEUECHAT_SECURITY__* instead.
CMD ["serve", "--config", "/etc/queuechat/queuechat.toml"]
