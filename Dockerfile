# syntax=docker/dockerfile:1
# The Model Rollouts operator. Multi-stage: dependencies are installed into a venv in the build
# stage; the runtime stage copies only the venv, runs as a numeric non-root user, needs no shell
# and works with a read-only root filesystem (only /tmp needs to be writable).
#
# BASE_IMAGE must provide python3 (>= 3.11) with the venv module at the same path in both stages.
# Where no registry is reachable, hack/build-image.sh builds one with debootstrap and passes it.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/model-rollouts
WORKDIR /src
COPY hack/image/constraints.txt ./constraints.txt
COPY pyproject.toml ./
# Dependencies first (their own layer, cached while the pins and pyproject.toml do not change), then
# the package. Only the operator's own dependencies (project.dependencies), pinned by
# constraints.txt: not the extras (the kubectl plugin's rich, jsonschema and cel-python; the
# report's matplotlib; the dev tools).
# An optional build secret `pip_ca` is a CA bundle for pip (a TLS-intercepting proxy's); it is
# used in this stage only and is not part of any layer.
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && /opt/model-rollouts/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >requirements.txt \
 && /opt/model-rollouts/bin/pip install --no-compile -c constraints.txt -r requirements.txt
COPY README.md LICENSE ./
COPY operator ./operator
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && /opt/model-rollouts/bin/pip install --no-compile -c constraints.txt . \
 && find /opt/model-rollouts/lib -depth -type d \( -name tests -o -name __pycache__ \) \
      -path '*/site-packages/*' \( -path '*/numpy/*' -o -path '*/scipy/*' -o -name __pycache__ \) \
      -exec rm -rf {} + \
 && /opt/model-rollouts/bin/python -m compileall -q /opt/model-rollouts/lib \
 && /opt/model-rollouts/bin/pip uninstall -y -q pip \
 && /opt/model-rollouts/bin/model-rollouts --help >/dev/null

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="model-rollouts" \
      org.opencontainers.image.description="Kubernetes operator for statistically valid progressive delivery of ML models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /opt/model-rollouts /opt/model-rollouts
ENV PATH=/opt/model-rollouts/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
WORKDIR /tmp
# 8080: /metrics (Prometheus), 8081: /healthz (liveness) and /readyz (readiness).
EXPOSE 8080 8081
HEALTHCHECK --interval=30s --timeout=3s CMD ["/opt/model-rollouts/bin/python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8081/healthz', timeout=2)"]
ENTRYPOINT ["/opt/model-rollouts/bin/model-rollouts"]
CMD ["--metrics-port=8080", "--liveness=http://0.0.0.0:8081/healthz"]
