# An NVIDIA donor on PyTorch's CUDA runtime image. Run with --gpus all.
#   docker build -f docker/donor-cuda.Dockerfile -t llm-mesh-donor-cuda .
#   docker run --gpus all -e MESH_MODEL=... -e MESH_INITIAL_PEERS=... -p 31330:31330 -v mesh-cache:/cache llm-mesh-donor-cuda
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
RUN useradd --create-home --uid 1000 mesh && mkdir /cache /shared && chown mesh /cache /shared
WORKDIR /opt/llm-mesh
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY shards ./shards
COPY server ./server
COPY client ./client
# torch comes with the base image; installing without a constraints file keeps its CUDA build.
RUN pip install --no-cache-dir '.[donor]'
ENV HF_HOME=/cache MESH_CACHE_DIR=/cache/llm-mesh MESH_HOST=0.0.0.0 MESH_PORT=31330 MESH_DEVICE=cuda
VOLUME /cache
EXPOSE 31330
USER mesh
ENTRYPOINT ["mesh", "serve"]
