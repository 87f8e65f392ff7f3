"""LLM API gateway as an Envoy external-processing (ext_proc) server."""

__version__ = "0.1.0"
