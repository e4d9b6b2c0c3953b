# The OpenAI-compatible gateway (a mesh client; it loads only the model's embeddings and head).
#   docker run -e MESH_MODEL=... -e MESH_INITIAL_PEERS=... -e MESH_API_KEYS=sk-... -p 8000:8000 llm-mesh-gateway
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 mesh && mkdir /cache /shared && chown mesh /cache /shared
WORKDIR /opt/llm-mesh
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY shards ./shards
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch \
 && pip install --no-cache-dir '.[gateway]'
ENV HF_HOME=/cache MESH_CACHE_DIR=/cache/llm-mesh MESH_GATEWAY_HOST=0.0.0.0 MESH_GATEWAY_PORT=8000
VOLUME /cache
EXPOSE 8000
USER mesh
ENTRYPOINT ["mesh", "gateway"]
