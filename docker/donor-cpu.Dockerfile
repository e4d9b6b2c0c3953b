# A CPU donor: `mesh serve` configured through MESH_* environment variables.
#   docker build -f docker/donor-cpu.Dockerfile -t llm-mesh-donor-cpu .
#   docker run -e MESH_MODEL=Qwen/Qwen3-0.6B -e MESH_LAYERS=0:14 -e MESH_INITIAL_PEERS=/ip4/... \
#              -e MESH_PUBLIC_ADDRESS=203.0.113.7 -p 31330:31330 -v mesh-cache:/cache llm-mesh-donor-cpu
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 mesh && mkdir /cache /shared && chown mesh /cache /shared
WORKDIR /opt/llm-mesh
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY shards ./shards
COPY server ./server
COPY client ./client
# The CPU build of torch (the default index would bring CUDA wheels), then the donor's packages.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch \
 && pip install --no-cache-dir '.[donor]'
ENV HF_HOME=/cache MESH_CACHE_DIR=/cache/llm-mesh MESH_HOST=0.0.0.0 MESH_PORT=31330 MESH_DEVICE=cpu
VOLUME /cache
EXPOSE 31330
USER mesh
ENTRYPOINT ["mesh", "serve"]
