# syntax=docker/dockerfile:1.7
# The one image every pipeline component and every training worker runs in: CUDA torch,
# DeepSpeed with its CUDA ops compiled for the target GPUs, faiss-gpu, kfp, MLflow and this
# project, all from pyproject.toml (the only list of dependency versions; the build args below
# choose the CUDA build of torch within pyproject's range, and nothing else).
#
#   docker build -t REGISTRY/notellm2-kfp:$(notellm2 image | sed 's/.*://') \
#                --build-arg GIT_SHA=$(git rev-parse HEAD) .
#   (the tag `notellm2 compile` uses: package version + a hash of the source, so KFP's cache,
#   which keys on the image string, changes with the code)
#
# Two stages: `build` (CUDA -devel: nvcc and headers, to compile DeepSpeed's ops) and `runtime`
# (CUDA -runtime: the shared libraries only), which gets the finished Python and venv.

# Base images are pinned by tag and manifest-list digest (multi-arch index); refresh tag and
# digest together, e.g. `docker buildx imagetools inspect nvidia/cuda:12.6.3-devel-ubuntu24.04`.
# CUDA 12.6 matches the torch build below (cu126: a CUDA 12 build of torch 2.13, like the
# nvidia-*-cu12 libraries faiss-gpu-cu12 brings) and compiles for sm_80 and sm_90.

# uv installs a standalone CPython 3.11 (Ubuntu 24.04's own Python is 3.12) and the packages.
FROM ghcr.io/astral-sh/uv:0.8.4@sha256:40775a79214294fb51d097c9117592f193bcfdfc634f4daa0e169ee965b10ef0 AS uv

# nvidia/cuda:12.6.3-devel-ubuntu24.04
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04@sha256:392c0df7b577ecae17a17f6ba7f2009c217bb4422f8431c053ae9af61a8c148a AS build
# torch: the CUDA build matching the base image's CUDA 12.6, at the version the dev/CI
# environment pins (Makefile TORCH); pyproject.toml admits torch>=2.4,<2.15.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
# GPU architectures DeepSpeed's ops are compiled for: sm_80 cubins run on every 8.x GPU (A100,
# A10, L4), sm_90 on H100/H200; +PTX lets newer GPUs JIT-compile from sm_90 PTX.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
# DeepSpeed ops compiled now instead of JIT-compiled in every pod at first use (the runtime
# stage has no compiler): FusedAdam (CUDA, for the architectures above) and the flatten utils.
# Not CPUAdam: DeepSpeed compiles its host code with -march=native and the build host's SIMD
# width, which would crash with SIGILL on nodes with older CPUs; training hands DeepSpeed a
# torch.optim optimizer, also under offload (components/train/ds_config.py). The other ops stay
# off: nothing in this project calls them.
ARG DS_BUILD_OPS=0
ARG DS_BUILD_FUSED_ADAM=1
ARG DS_BUILD_UTILS=1
ARG MAX_JOBS=8
# (DS_ACCELERATOR=cuda below: there is no GPU at build time to detect, and DeepSpeed would
# otherwise build for the CPU accelerator.)

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A C++ compiler for the host side of DeepSpeed's ops. Not version-pinned: this stage is thrown
# away (nothing from apt reaches the runtime image), and exact Ubuntu package versions vanish
# from the archive with each security update, which would break the build instead of securing it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    DS_ACCELERATOR=cuda \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DS_BUILD_OPS=${DS_BUILD_OPS} \
    DS_BUILD_FUSED_ADAM=${DS_BUILD_FUSED_ADAM} \
    DS_BUILD_UTILS=${DS_BUILD_UTILS} \
    MAX_JOBS=${MAX_JOBS}
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv

# torch first, from the CUDA index; then the build tools DeepSpeed's setup.py imports (it is
# built without isolation, against this torch). Build tools only: they are not in the image's
# dependency set, so they follow the resolver rather than a pin.
RUN uv pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && uv pip install setuptools wheel ninja packaging

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY components ./components
COPY pipelines ./pipelines
# The project with its pyproject dependencies and the gpu extra; torch held at the build above.
# faiss-cpu is a core dependency (CPU machines) and shares the `faiss` module with
# faiss-gpu-cu12: remove it and lay faiss-gpu-cu12, at the version just resolved, back over it.
# Last, check that the ops were prebuilt (read from DeepSpeed's install record: importing
# deepspeed would set up its CUDA accelerator on a machine without a GPU).
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
 && uv pip install --constraint /tmp/torch-constraint.txt \
        --no-build-isolation-package deepspeed ".[gpu]" \
 && uv pip uninstall faiss-cpu \
 && faiss_gpu="$(uv pip show faiss-gpu-cu12 | sed -n 's/^Version: //p')" \
 && uv pip install --reinstall --no-deps "faiss-gpu-cu12==${faiss_gpu}" \
 && python -c "import faiss, kfp, mlflow, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && python -c "import importlib.util as u, os, runpy; d = u.find_spec('deepspeed').submodule_search_locations[0]; ops = runpy.run_path(os.path.join(d, 'git_version_info_installed.py'))['installed_ops']; print('prebuilt DeepSpeed ops', sorted(k for k, v in ops.items() if v)); assert ops['fused_adam'] and ops['utils'], ops"

# nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04@sha256:92906d87596d638d35015c6353053121bd299d25943b875763321653884ba924 AS runtime
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="notellm2-kfp" \
      org.opencontainers.image.description="NoteLLM-2 training, embedding, indexing and evaluation for Kubeflow Pipelines" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_SHA}"
# A fixed UID the Kubernetes manifests name in runAsUser (10001); no login shell, no password.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin notellm2
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NOTELLM2_GIT_SHA=${GIT_SHA} \
    HOME=/home/notellm2 \
    HF_HOME=/home/notellm2/.cache/huggingface
USER 10001:10001
WORKDIR /home/notellm2
# A batch image: KFP and Kubeflow Trainer give every container its own command, and liveness is
# the process's exit code, so there is no long-running service for a HEALTHCHECK to probe.
# checkov:skip=CKV_DOCKER_2:batch image for KFP tasks and TrainJob workers; no service to health-check
ENTRYPOINT []
CMD ["notellm2", "--help"]
