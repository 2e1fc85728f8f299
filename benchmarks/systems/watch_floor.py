"""The file-watching floor: watchfiles.awatch alone, with the daemon's debounce and step
(PublisherSettings defaults) and filter, on a copy of the tree, the same temp-file-and-
rename save; the time from t0 to awatch yielding. One watcher: it does not depend on N.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from harness import EDITED, SAMPLE, atomic_save, edited_text


class WatchFloor:
    name = "watch_floor"
    label = "watchfiles floor"

    def __init__(self, scratch: Path) -> None:
        from configbus.publisher import PublisherSettings

        fields = PublisherSettings.__dataclass_fields__
        self.debounce_ms: int = fields["debounce_ms"].default
        self.step_ms: int = fields["step_ms"].default
        self.root = scratch / "watch" / "environments"
        shutil.copytree(SAMPLE, self.root)
        self.target = self.root / EDITED
        self.original = self.target.read_text()

    async def measure(self, edits: int, warmup: int) -> list[float]:
        import watchfiles

        def tree_files(change: Any, path: str) -> bool:  # the daemon's filter
            name = os.path.basename(path)
            return name.endswith((".yml", ".json")) and not name.startswith(".")

        stop = asyncio.Event()
        seen: asyncio.Queue[int] = asyncio.Queue()

        async def watch() -> None:
            async for _ in watchfiles.awatch(
                self.root,
                debounce=self.debounce_ms,
                step=self.step_ms,
                stop_event=stop,
                watch_filter=tree_files,
            ):
                seen.put_nowait(time.time_ns())

        task = asyncio.create_task(watch())
        await asyncio.sleep(1.0)  # let the watcher set up its inotify watches
        samples = []
        try:
            for edit in range(warmup + edits):
                t0 = atomic_save(self.target, edited_text(self.original, edit))
                detected = await asyncio.wait_for(seen.get(), 10)
                if edit >= warmup:
                    samples.append((detected - t0) / 1e6)
                await asyncio.sleep(0.1 + random.random() * 0.05)
                while not seen.empty():
                    seen.get_nowait()
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 5)
        return samples
