# mmkv app on CPU:   docker build -t mmkv . && docker run --rm -p 7860:7860 mmkv   -> http://localhost:7860
# A model of your own: docker run -e MMKV_MODEL=/models/my-vlm -v /path/to/my-vlm:/models/my-vlm ... mmkv
# (hub ids work when the container can reach the Hugging Face hub; mount ~/.cache/huggingface to reuse downloads).
# The image serves the public by default (MMKV_HOSTED=1): visitors may load only MMKV_MODEL and the bundled
# model (add names with -e MMKV_ALLOWED_MODELS=a,b or "*"), with bounded prompts; -e MMKV_HOSTED=0 lifts it.
# Every setting: docs/hosting.md.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    MMKV_HOSTED=1

# OpenCV (headless) still needs glib at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first from the CPU wheel index (the default index's Linux wheels bundle CUDA: several GB);
# pass --build-arg TORCH_INDEX=... to use another index (e.g. a mirror).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX}" "$(grep -E '^torch==' requirements.txt)" \
    && pip install -r requirements.txt

COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 app \
    && mkdir -p .cache && chown -R app:app /app
USER app

EXPOSE 7860
# Default model: $MMKV_MODEL, else mmkv/assets/mmkv-tiny-qwen2vl when present, else a tiny random-weight
# demo model built on first start (the page says so).
CMD ["python", "app.py"]
