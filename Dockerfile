# The moray image every Ray pod runs (infra/, `moray deploy --image`): Python 3.11, the pinned
# dependencies of constraints.txt, moray and its configs at /app (the working directory: RayJob
# entrypoints name configs/... relative to it).
#
#   docker build -t moray:latest .                                  # CPU torch
#   docker build -t moray:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

# KubeRay's health probes run wget inside the Ray containers
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app

# torch first, from the chosen index (the pin in constraints.txt matches its +cpu / +cu build)
RUN pip install --upgrade pip && pip install --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY moray ./moray
RUN pip install -c constraints.txt .
COPY configs ./configs
COPY dashboards ./dashboards

# Ray's token authentication stays on: KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN from the Secret
RUN useradd --create-home --uid 1000 ray && chown -R ray /app
USER ray
EXPOSE 6379 8265 8000 8080
