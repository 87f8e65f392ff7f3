"""Code a test gateway.yaml points a custom PII validator at (the server imports it by name)."""

from __future__ import annotations


def explode(value: str) -> bool:
    """A validator that fails: the request it scans must be refused, never forwarded raw."""
    raise RuntimeError("validator failure forced by the test")
