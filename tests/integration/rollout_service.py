"""A service process for the staged-rollout tests: one subscriber of one stream, with
labels, fast heartbeats, and a way to go wrong when it sees a given value of
``database.postgresql.connection_pool.max_size``:

- ``--refuse N``: a validator refuses a config holding N;
- ``--crash-on N``: the process dies (``os._exit(3)``, no goodbye) once it applied N;
- ``--sick-on N``: its health check fails while it runs N.

After every apply it writes what it runs to ``<state-dir>/<instance>.json`` (atomically):
the value, the snapshot version and the candidate version. The test reads those files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from configbus.subscriber import ConfigSubscriber

POOL = "database.postgresql.connection_pool.max_size"


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("bootstrap", "trust", "prefix", "acks", "instance", "zone", "state_dir"):
        parser.add_argument(f"--{option.replace('_', '-')}", required=True)
    parser.add_argument("--tenant", default="aurora-records")
    parser.add_argument("--env", default="prod")
    parser.add_argument("--refuse", type=int)
    parser.add_argument("--crash-on", type=int)
    parser.add_argument("--sick-on", type=int)
    parser.add_argument("--heartbeat", type=float, default=0.3)
    asyncio.run(serve(parser.parse_args()))


async def serve(args: argparse.Namespace) -> None:
    state = Path(args.state_dir) / f"{args.instance}.json"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sub = ConfigSubscriber(
        args.tenant,
        args.env,
        bootstrap_servers=args.bootstrap,
        trust=args.trust,
        instance_id=args.instance,
        service="records-api",
        topic_prefix=args.prefix,
        acks_topic=args.acks,
        labels={"zone": args.zone},
        heartbeat=args.heartbeat,
        trust_reload=0,
    )
    if args.refuse is not None:
        sub.add_validator(lambda config: config.get(POOL) != args.refuse)

    def healthy() -> bool:
        return args.sick_on is None or sub.config.get(POOL) != args.sick_on

    sub.add_health_check(healthy)

    def record(*_: Any) -> None:
        snapshot = sub.snapshot
        value = snapshot.config.get(POOL)
        temporary = state.with_suffix(".tmp")
        temporary.write_text(
            json.dumps(
                {
                    "pool": value,
                    "version": snapshot.version,
                    "candidate": snapshot.candidate_version,
                }
            )
        )
        os.replace(temporary, state)
        if args.crash_on is not None and value == args.crash_on:
            os._exit(3)  # a config that kills the process that applied it

    async def follow() -> None:  # every swap, also one that changes no value
        seen: Any = None
        while True:
            seen = await sub.wait_for(lambda snapshot, last=seen: snapshot is not last)
            record()

    sub.on_change("", record)  # the service's own reaction to a changed value
    async with sub:
        follower = asyncio.create_task(follow())
        await stop.wait()
        follower.cancel()


if __name__ == "__main__":
    main()
