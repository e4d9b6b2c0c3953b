# An AMD donor on AMD's ROCm PyTorch image. Run with --device=/dev/kfd --device=/dev/dri --group-add video.
#   docker build -f docker/donor-rocm.Dockerfile -t llm-mesh-donor-rocm .
FROM rocm/pytorch:latest
RUN useradd --create-home --uid 1000 mesh && mkdir /cache /shared && chown mesh /cache /shared
WORKDIR /opt/llm-mesh
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY shards ./shards
COPY server ./server
COPY client ./client
# torch (ROCm build) comes with the base image; bitsandbytes' ROCm support varies: use --dtype, not --quant.
RUN pip install --no-cache-dir '.[donor]'
# ROCm builds of torch address AMD GPUs as "cuda"; `mesh serve` reports the backend as rocm.
ENV HF_HOME=/cache MESH_CACHE_DIR=/cache/llm-mesh MESH_HOST=0.0.0.0 MESH_PORT=31330 MESH_DEVICE=rocm
VOLUME /cache
EXPOSE 31330
USER mesh
ENTRYPOINT ["mesh", "serve"]
