# The consumers: this package with its [consumers] extra (vector-store clients) on a slim
# Python base. Entrypoint: `vllm-mm-events`; the Helm chart passes `consume --source ...`.
#
# Build from the repository root:
#   docker build -f docker/consumer.Dockerfile -t <registry>/vllm-mm-events-consumer:0.1.0 .
#
# Only pyproject.toml, README.md, publisher/, schemas/ and consumers/ are copied, so the
# image does not depend on what else is in the checkout. A .dockerignore with `.venv/`,
# `.git/` and `benchmarks/` keeps the build context small; this repository has none.
#
# Not built in this repository's CI (its machines have no Docker engine).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY publisher/ publisher/
COPY schemas/ schemas/
COPY consumers/ consumers/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[consumers]"

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/venv /opt/venv
# A numeric non-root user (the chart sets runAsNonRoot with uid 10001). Nothing is written
# outside /tmp, which the chart mounts as an emptyDir: the root filesystem can be read-only.
RUN groupadd --system --gid 10001 consumer \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin consumer
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp

# Prometheus metrics (/metrics) and health (/healthz).
EXPOSE 9400
ENTRYPOINT ["vllm-mm-events"]
CMD ["--help"]
