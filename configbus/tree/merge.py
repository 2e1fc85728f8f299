"""The merge rules, in one place.

- Mappings merge deeply: keys of the higher layer are merged into the lower one's.
- Scalars and lists replace: a list in a higher layer replaces the whole list.
- ``!delete`` (`DELETE`) removes the key, whatever the layers below set there.

The merge copies only the mappings on the paths the higher layer touches and shares
everything else, so its cost grows with the size of the higher layer, not the lower.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from threading import Lock
from typing import cast

from configbus.tree.layer import Layer
from configbus.tree.values import DELETE, EMPTY, FrozenDict, LayerValue, Value

__all__ = ["MergeCache", "merge"]


def merge(lower: Mapping[str, Value], higher: Mapping[str, LayerValue]) -> Mapping[str, Value]:
    """`higher` laid over `lower`. Neither is changed; the result holds no `DELETE`."""
    if not higher:
        return lower
    out = dict(lower)
    for key, value in higher.items():
        if value is DELETE:
            out.pop(key, None)
            continue
        if isinstance(value, dict):
            below = out.get(key)
            out[key] = merge(below if isinstance(below, dict) else EMPTY, value)
        else:
            out[key] = cast(Value, value)  # no DELETE inside lists: the parser refuses it
    return FrozenDict(out)


class MergeCache:
    """Merges stacks of layers, remembering the merge of every proper prefix.

    Streams share their lower layers (every tenant's prod stream starts with the same
    base, prod and override files), so with the prefixes cached, resolving a stream
    costs one merge of its own top layers. Keys are tuples of layers, which compare by
    identity: a re-read file is a new layer and misses the cache. Bounded LRU.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[Layer, ...], Mapping[str, Value]] = OrderedDict()
        self._lock = Lock()

    def merge(self, layers: Sequence[Layer]) -> Mapping[str, Value]:
        stack = tuple(layers)
        start, merged = 0, EMPTY
        with self._lock:
            for end in range(len(stack) - 1, 0, -1):
                hit = self._entries.get(stack[:end])
                if hit is not None:
                    self._entries.move_to_end(stack[:end])
                    start, merged = end, hit
                    break
        for end in range(start, len(stack)):
            merged = merge(merged, stack[end].data)
            if end + 1 < len(stack):
                self._remember(stack[: end + 1], merged)
        return merged

    def _remember(self, key: tuple[Layer, ...], merged: Mapping[str, Value]) -> None:
        with self._lock:
            self._entries[key] = merged
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
