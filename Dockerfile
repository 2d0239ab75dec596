# covidseg service image (API and worker). GPU: run the worker on a host with the NVIDIA container toolkit;
# for CUDA inside the image, swap tensorflow-cpu for tensorflow[and-cuda] in requirements.txt.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SM_FRAMEWORK=tf.keras TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt pyproject.toml ./
RUN pip install -r requirements.txt && pip install --no-deps tf-keras==2.21.0
COPY . .
RUN pip install --no-deps -e . && useradd -r -u 10001 covidseg && chown -R covidseg /app
USER covidseg
EXPOSE 8000
