# GPU model server: CUDA 13 + cuDNN 9 runtime (what onnxruntime-gpu 1.31 links against), TensorRT from PyPI,
# ONNX Runtime and the web stack. Only deploy/ is copied: no torch, no training code, starts in seconds.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# GRAFT_*: serving settings by their variables (deploy/settings.py) and the one cache folder; tests/test_serving_settings.py
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1 \
    GRAFT_HOST=0.0.0.0 GRAFT_PORT=8000 GRAFT_CACHE_DIR=/var/cache/graft GRAFT_PROVIDERS=tensorrt,cuda,cpu GRAFT_STRICT=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/requirements-serve.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt tensorrt-cu13
WORKDIR /srv
COPY deploy/ /srv/deploy/
RUN useradd --system --uid 10001 graft && mkdir -p /var/cache/graft && chown graft /var/cache/graft
USER graft
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')" || exit 1
# The container listens on all its interfaces; compose publishes the port on the host's 127.0.0.1 only.
CMD ["python3", "-m", "deploy.server"]
