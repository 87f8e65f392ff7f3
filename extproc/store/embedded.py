"""The zero-setup backend: state in one directory (the SQLite file gateway.yaml names and what sits
next to it), for one server process. Users open their own SQLite connections on `path` and run
them in worker threads: nothing blocking on the event loop."""

from __future__ import annotations

from pathlib import Path


class EmbeddedBackend:
    kind = "embedded"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.state_dir = self.path.parent

    async def close(self) -> None:
        return None
