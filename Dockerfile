# diffqc inspection service, CPU only.
# UNTESTED HERE: Docker cannot run on the machine this was written on.
#
#   docker build -t diffqc .
#   docker run --rm -p 127.0.0.1:8000:8000 -e DIFFQC_TOKEN=... \
#       -v "$PWD/model:/model:ro" -v diffqc-data:/data diffqc
#
# For a smaller image, point pip at a CPU-only torch wheel index at build time:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<cpu wheel index> -t diffqc .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=2

ARG PIP_EXTRA_INDEX_URL=""

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY src ./src
RUN pip install ".[serve]" \
    && useradd --create-home --uid 10001 diffqc \
    && mkdir -p /data /model \
    && chown diffqc:diffqc /data

USER diffqc
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]

# The token comes from DIFFQC_TOKEN, the store from DIFFQC_DB (default: SQLite under /data).
ENV DIFFQC_DB=/data/results.db
ENTRYPOINT ["python", "-m", "diffqc.service"]
CMD ["serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
