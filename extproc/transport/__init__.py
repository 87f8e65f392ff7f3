"""How the ext_proc server talks to Envoy: its own HTTP/2 + gRPC transport (h2server), or grpc.aio."""
