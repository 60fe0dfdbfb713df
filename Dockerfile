# shardkit's image. Plain Dockerfile syntax only (no RUN --mount): docker-py, which `nox -s build` drives,
# has no BuildKit. Every install is offline and hash-checked: the wheels are fetched on the host into
# build/wheels first (`shardkit image wheels`), as an air-gapped GPU cluster needs anyway.
#
#   FLAVOUR=cuda (default): NVIDIA's CUDA 13.0 devel image, torch 2.14.1 (built for CUDA 13), DeepSpeed's
#                           CPU Adam and fused Adam ops compiled for TORCH_CUDA_ARCH_LIST at build time.
#   FLAVOUR=cpu:            the same stages on a local Debian base (`shardkit image base`), torch 2.13.0+cpu.
#   FLAVOUR=period:         the table's own 2023 stack for A100-class cards: CUDA 11.8 devel on Ubuntu 22.04
#                           (Python 3.10), torch 2.0.1 (its CUDA 11.7 build, kernels up to sm_86),
#                           transformers 4.28.1, accelerate 0.18.0, DeepSpeed 0.9.2 (ops for sm_80 and sm_86),
#                           pydantic 1.10; HF Trainer is its engine. `shardkit image build --flavour period`
#                           passes the BASE_IMAGE and TORCH_CUDA_ARCH_LIST below for it.
ARG FLAVOUR=cuda
# Tag and the digest published for it (seen pinned in more than one public Dockerfile).
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04@sha256:e071e85c52ad91fc9ea24158ff5330876b2d1a5c4ac83ccc6066976835873c01

FROM ${BASE_IMAGE} AS build
ARG FLAVOUR
# A100 and H100; DeepSpeed's op builder cannot parse torch's own "9.0a" (invalid literal for int(): '0a'), so it is set here.
ARG TORCH_CUDA_ARCH_LIST="8.0 9.0"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The CUDA bases have no Python; the CPU base was made with it (and g++ for DeepSpeed's CPU ops).
RUN if [ "$FLAVOUR" != cpu ]; then apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
      && rm -rf /var/lib/apt/lists/*; fi
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements /requirements
COPY build/wheels /wheels
RUN pip install --require-hashes --no-deps -r /requirements/build.lock \
 && pip install --require-hashes -r /requirements/${FLAVOUR}.lock
# DeepSpeed after torch, without build isolation, so that its ops are compiled against this torch.
RUN if [ "$FLAVOUR" != cpu ]; then \
      export DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"; fi \
 && if [ "$FLAVOUR" = period ]; then lock=period-deepspeed; else lock=deepspeed; fi \
 && pip install --require-hashes --no-deps --no-build-isolation -r /requirements/$lock.lock

FROM ${BASE_IMAGE} AS runtime
ARG FLAVOUR
ENV DEBIAN_FRONTEND=noninteractive
RUN if [ "$FLAVOUR" != cpu ]; then apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-dev g++ \
      && rm -rf /var/lib/apt/lists/*; fi
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 1000 shardkit && mkdir -p /results && chown shardkit /results
ENV PATH=/opt/venv/bin:$PATH SHARDKIT_RECIPES=/opt/shardkit/recipes SHARDKIT_FLAVOUR=$FLAVOUR \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# shardkit itself last, so that a change to it rebuilds only the layers below.
COPY recipes /opt/shardkit/recipes
COPY pyproject.toml README.md /opt/shardkit/src/
COPY src /opt/shardkit/src/src
# Declared this late because a build argument that changes misses the cache of every RUN after it.
ARG GIT_COMMIT=unknown
ENV SHARDKIT_GIT_COMMIT=$GIT_COMMIT
# Installed, then the image records its own versions and proves it can import the training core.
RUN pip install --no-index --no-deps --no-build-isolation --no-cache-dir /opt/shardkit/src \
 && pip freeze > /opt/shardkit/versions.txt && pip check \
 && if [ "$FLAVOUR" = cpu ]; then export DS_ACCELERATOR=cpu; fi \
 && modules="shardkit.train, shardkit.engine.hf_trainer" \
 && if [ "$FLAVOUR" != period ]; then modules="$modules, shardkit.engine.fsdp"; fi \
 && python -c "import torch, transformers, deepspeed, $modules; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'deepspeed', deepspeed.__version__)"
USER shardkit
WORKDIR /opt/shardkit/recipes
CMD ["shardkit", "--help"]
