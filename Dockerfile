# covidseg service image (API and worker).
#   API:    docker build -t covidseg .
#   worker: docker build --build-arg TF_GPU=1 -t covidseg-worker .   (TensorFlow with CUDA; it uses the GPU when
#           the container sees one — docker-compose.yml reserves one — and the CPU otherwise)
FROM python:3.11-slim
ARG TF_GPU=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SM_FRAMEWORK=tf.keras TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt pyproject.toml ./
RUN pip install -r requirements.txt && pip install --no-deps tf-keras==2.21.0 \
 && if [ -n "$TF_GPU" ]; then pip uninstall -y tensorflow-cpu && pip install "tensorflow[and-cuda]==2.21.0"; fi
COPY . .
RUN pip install --no-deps -e . && useradd -r -u 10001 -m covidseg && chown -R covidseg /app
USER covidseg
EXPOSE 8000
