# bitserve: OpenAI-compatible server for low-bit LLMs on CPUs.
#   docker build -t bitserve .
#   docker run -p 8000:8000 -e BITSERVE_API_KEYS=... bitserve
# Every `bitserve serve` flag is also an environment variable BITSERVE_<FLAG> (see README).
#
# Model layout:
# - The default model is baked into the image at /opt/bitserve/models, and BITSERVE_MODEL points at that file, so a
#   container serves at once, with no download at start.
# - BITSERVE_MODELS_DIR=/models is a separate, initially empty directory for a volume holding extra models, which the
#   admin API loads by name.
# - The baked model is not put in /models on purpose. Docker copies an image directory into a named volume only when
#   the volume is first created, so a newer image would keep serving the stale copy. Kubernetes volumes are never
#   seeded from the image at all.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/opt/bitserve/numba-cache \
    BITSERVE_MODELS_DIR=/models \
    BITSERVE_MODEL=/opt/bitserve/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    BITSERVE_PORT=8000

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/bitserve bitserve

WORKDIR /src

# Dependencies first, read from pyproject.toml alone: this layer is rebuilt only when the dependency list changes,
# not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The same install as the README's. The source tree is removed afterwards so that every later step imports the
# installed package: Numba keys its cache on the source file's path, and the kernels must be compiled from the same
# paths that the server imports at run time.
COPY README.md ./
COPY engine ./engine
COPY server ./server
RUN pip install . \
    && rm -rf /src

WORKDIR /home/bitserve

# `bitserve pull` is the one place that knows the default model's source and SHA-256. It comes after the source
# layer, so a source change fetches the model again. The `test -f` makes the build fail if the file name ever stops
# matching BITSERVE_MODEL.
RUN bitserve pull --models-dir /opt/bitserve/models \
    && test -f "$BITSERVE_MODEL"

# Compile every kernel signature now, so no request waits for JIT.
# - The cache stays owned by the runtime user. A host whose CPU differs from the build host's (other SIMD features)
#   misses the cache, and the server then compiles at start and writes the new entries next to the baked ones.
# - /models is created owned by that user, so a named volume mounted there is writable by it.
RUN mkdir -p "$NUMBA_CACHE_DIR" /models \
    && chown bitserve:bitserve "$NUMBA_CACHE_DIR" /models
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
RUN python -m engine.warmup

EXPOSE 8000

# /ready, not /health: a container is healthy only once the model is loaded and the kernels are warm.
# The long start period covers a kernel recompile on a CPU other than the build host's.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BITSERVE_PORT', '8000') + '/ready', timeout=4)"]

CMD ["bitserve", "serve", "--host", "0.0.0.0"]
