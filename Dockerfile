# The ext_proc server image (also runs the mock provider for the compose demo).
# Envoy runs from the official envoyproxy/envoy image beside it (see docker-compose.yml, k8s/).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir . && rm -rf /root/.cache
# Default config: Redis-backed (the embedded store needs a writable directory; mount one and
# your own gateway.yaml to use it).
COPY k8s/gateway.yaml /etc/gateway/gateway.yaml

# Non-root; the server needs no writable filesystem.
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]
