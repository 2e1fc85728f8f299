"""How big a config may be: one set of limits, enforced where configs are made (the tree,
the store, the publisher) and again where they are read (every subscriber).

A config that breaks a limit is refused with one line naming the stream, the limit and
the figure; the stream keeps its last good version. The defaults are generous for real
configs (the largest sample config is ~3 KiB of JSON, six levels deep, ~150 values) and
far below what hurts a process:

- ``config_bytes`` 4 MiB of canonical JSON: a config is read by every instance on every
  apply; past a few MiB it is data, not configuration. Also the inflate bound: a
  subscriber never decompresses more than this, whatever a record claims.
- ``event_bytes`` 1 MiB per record: Kafka's default ``max.message.bytes`` (1048588), so an
  event that fits this fits a default topic. The publisher also reads each topic's own
  setting and refuses events above it before sending.
- ``depth`` 32 levels: real configs stay below 10; Python's recursion limit (1000) is
  what a hostile 500-deep value used to hit.
- ``nodes`` 200,000 values (mappings, lists and scalars): bounds the work and memory of
  resolving, hashing and diffing, and YAML alias expansion (a few hundred bytes of nested
  aliases expand to billions of nodes).
- ``text_chars`` 1,000 characters for metadata that travels in events and logs (a
  store write's reason and actor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from configbus.errors import LimitError

__all__ = ["DEFAULT_LIMITS", "LimitError", "Limits"]

KiB: Final = 1024
MiB: Final = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds for one config and its event; see the module doc for the defaults."""

    config_bytes: int = 4 * MiB
    event_bytes: int = 1 * MiB
    depth: int = 32
    nodes: int = 200_000
    text_chars: int = 1000


DEFAULT_LIMITS: Final = Limits()
