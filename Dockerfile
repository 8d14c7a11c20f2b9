# syntax=docker/dockerfile:1.7
# The one image every pipeline component and training worker runs in.
# Build:  docker build -t <registry>/notellm2-kfp:$(python -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])') .
# First version: CUDA comes with the torch wheels (nvidia-* packages); the host supplies the
# driver. A pinned CUDA runtime base with DeepSpeed ops prebuilt follows in the packaging issue.

# python:3.11-slim-bookworm, pin by digest when you mirror it: FROM python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY components ./components
COPY pipelines ./pipelines
# faiss-cpu is a core dependency (CPU machines); the image swaps it for the GPU build.
RUN pip install ".[gpu]" \
 && pip uninstall -y faiss-cpu \
 && pip install --force-reinstall --no-deps "faiss-gpu-cu12>=1.11"

FROM ${PYTHON_IMAGE} AS runtime
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="notellm2-kfp" \
      org.opencontainers.image.revision="${GIT_SHA}"
RUN useradd --create-home --uid 10001 notellm2
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NOTELLM2_GIT_SHA=${GIT_SHA} \
    HF_HOME=/home/notellm2/.cache/huggingface
USER 10001
WORKDIR /home/notellm2
ENTRYPOINT []
CMD ["notellm2", "--help"]
