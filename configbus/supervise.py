"""One retry policy and one supervisor for every background task.

`Backoff` is the only retry schedule in configbus: exponential, jittered, capped, reset
after a success. `supervise` runs a task body for as long as its owner lives: whatever
the body raises (except cancellation) is logged with the task's name and the body is
started again after the next backoff delay, so no background task dies silently.
`finish` stops such a task within a bound, so that a library that swallows a
cancellation cannot hang a `stop()`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from configbus.errors import ConfigBusError

__all__ = ["Backoff", "finish", "supervise"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Backoff:
    """Delays of `initial`, doubling up to `maximum`, each jittered by ±50 % so that
    many clients retrying one server do not retry in step."""

    initial: float = 0.1
    maximum: float = 5.0
    _next: float = field(default=0.0, init=False)

    def delay(self) -> float:
        """The delay before the next attempt (and move the schedule on)."""
        current = self._next or self.initial
        self._next = min(current * 2, self.maximum)
        return current * random.uniform(0.5, 1.5)

    def reset(self) -> None:
        """After a success: the next failure starts from `initial` again."""
        self._next = 0.0

    async def sleep(self) -> float:
        """Sleep for the next delay; returns it."""
        delay = self.delay()
        await asyncio.sleep(delay)
        return delay


async def supervise(
    name: str,
    body: Callable[[], Awaitable[None]],
    backoff: Backoff | None = None,
    *,
    on_failure: Callable[[Exception], None] | None = None,
) -> None:
    """Run `body()` until cancelled. When it returns, it is done; when it raises, the
    error is logged (expected errors in one line, anything else with its traceback),
    `on_failure` is told (a metric), and `body()` runs again after a backoff delay."""
    backoff = backoff or Backoff()
    while True:
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except ConfigBusError as exc:
            delay = backoff.delay()
            log.warning("%s failed, restarting in %.2fs: %s", name, delay, exc)
            failure: Exception = exc
        except Exception as exc:
            delay = backoff.delay()
            log.exception("%s failed unexpectedly, restarting in %.2fs", name, delay)
            failure = exc
        if on_failure is not None:
            on_failure(failure)
        await asyncio.sleep(delay)


async def finish(task: asyncio.Task[None] | None, what: str, grace: float = 5.0) -> None:
    """Cancel `task` and wait for it, at most `grace` seconds (a library under it may
    swallow a cancellation); an error it had ended with is logged, not raised."""
    if task is None:
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        log.error("%s did not stop within %gs; leaving it", what, grace)
        return
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s had failed: %r", what, error)
