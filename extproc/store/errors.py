from __future__ import annotations


class StoreUnavailable(Exception):
    """The store cannot be reached; callers decide between failing closed and failing open."""
