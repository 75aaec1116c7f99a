# vLLM's official OpenAI-compatible server image plus this package (the publisher, found by
# vLLM through its `vllm.general_plugins` entry point). Used by the Helm chart's vLLM
# Deployment, which sets the command (`vllm serve ...`) itself.
#
# Build from the repository root:
#   docker build -f docker/vllm.Dockerfile --build-arg VLLM_VERSION=v0.32.0 -t <registry>/vllm-mm-events-vllm:0.1.0 .
#
# Only pyproject.toml, README.md, publisher/, schemas/ and consumers/ are copied, so the
# image does not depend on what else is in the checkout. A .dockerignore with `.venv/`,
# `.git/` and `benchmarks/` keeps the build context small; this repository has none.
#
# Not built in this repository's CI (its machines have no Docker engine).

ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

# The package only (no extras): vLLM, torch and safetensors come with the base image.
WORKDIR /opt/vllm-mm-events
COPY pyproject.toml README.md ./
COPY publisher/ publisher/
COPY schemas/ schemas/
COPY consumers/ consumers/
RUN python3 -m pip install --no-cache-dir . \
 && python3 -c "import publisher.vllm.plugin as p; p.register()"

# A numeric non-root user (the chart sets runAsNonRoot with uid 2000). HOME and the caches
# are mounted writable by the chart, so the root filesystem can be read-only.
RUN groupadd --system --gid 2000 vllm \
 && useradd --system --uid 2000 --gid 2000 --home-dir /home/vllm --create-home --shell /usr/sbin/nologin vllm
ENV HOME=/home/vllm \
    PYTHONDONTWRITEBYTECODE=1
USER 2000:2000
WORKDIR /home/vllm

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
