# flexwebchat: the gRPC facade over Twilio Flex WebChats.
# Build: docker build -t flexwebchat .   Run: docker run -p 50051:50051 -e TWILIO_... flexwebchat
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the locked dependencies and the package into a virtualenv -----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Every dependency (OpenTelemetry and the build backend included) exactly as `make lock` locked
# it, each file checked against its hashes; wheels only, as an sdist would build with unlocked
# tools. Then the package itself: no dependencies of its own, built by the locked setuptools.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY generated ./generated
COPY service ./service
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# --- runtime: the virtualenv only, as a non-root user -------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="flexwebchat" \
      org.opencontainers.image.description="gRPC facade over Twilio Flex's WebChats API" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin flexwebchat
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /
# gRPC, Prometheus /metrics, plaintext health for the kubelet (HEALTH_PORT)
EXPOSE 50051 9464 8086
# Exec form: python is PID 1 and handles SIGTERM itself (drain, then exit 0). The checkout's
# service/ package installs as flexwebchat_server (python -m service runs it from a checkout).
ENTRYPOINT ["python", "-m", "flexwebchat_server"]
