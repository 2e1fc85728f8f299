"""Redis pub/sub, what a team might use instead: the writer SETs the config (the
aurora-records/prod resolved config, about 11 KB of JSON, with the edited value) and
PUBLISHes a notification; each subscriber has its own connections, receives it, GETs
the value and decodes the JSON. t0: just before the SET. Nothing is signed or verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from fleet import Closer, Report
from harness import BASE, config_value, edit_of

from systems import System


async def clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    import redis.asyncio as aioredis

    async def open_one() -> tuple[Any, Any]:
        client = aioredis.Redis.from_url(spec["redis_url"])
        pubsub = client.pubsub()
        await pubsub.subscribe(spec["channel"])
        async with asyncio.timeout(10):
            while (m := await pubsub.get_message(timeout=1.0)) is None or m["type"] != "subscribe":
                pass
        await client.ping()  # opens the connection the GETs use
        return client, pubsub

    pairs = await asyncio.gather(*(open_one() for _ in indices))

    async def read(index: int, client: Any, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                value = await client.get(spec["key"])
                report(index, edit_of(value), time.time_ns(), None)

    tasks = [asyncio.create_task(read(i, *pair)) for i, pair in zip(indices, pairs, strict=True)]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client, pubsub in pairs:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    return close


class RedisPubSub(System):
    name = "redis_pubsub"
    label = "Redis pub/sub + GET"
    module = "redis_pubsub"
    servers = ("redis",)

    def spec(self) -> dict[str, Any]:
        return {"redis_url": self.ctx.redis_url, "key": self.key, "channel": self.channel}

    async def setup(self) -> None:
        import redis.asyncio as aioredis

        tag = uuid.uuid4().hex[:8]
        self.key, self.channel = f"e2e:{tag}:config", f"e2e:{tag}:changed"
        self.client = aioredis.Redis.from_url(self.ctx.redis_url)
        await self.client.set(self.key, config_value(self.ctx.document, -BASE))

    async def write(self, edit: int) -> int:
        value = config_value(self.ctx.document, edit)
        t0 = time.time_ns()
        await self.client.set(self.key, value)
        await self.client.publish(self.channel, str(edit))
        return t0

    async def teardown(self) -> None:
        if getattr(self, "client", None) is not None:
            with contextlib.suppress(Exception):
                await self.client.delete(self.key)
            await self.client.aclose()
