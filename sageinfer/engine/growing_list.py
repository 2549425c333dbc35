"""A fixed-length, read-only view of the start of a list that only grows: what a request's
intermediate output carries instead of a copy of its tokens so far. Copying them for every step made
assembling outputs quadratic in their length (256 requests at 8K tokens: 7 ms a step in the front end's
receiver thread, which holds the GIL the server's event loop needs)."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import islice


class GrowingListPrefix(Sequence):
    """The first `length` items of `items`, which may be appended to but never changed below there."""

    __slots__ = ("_items", "_length")

    def __init__(self, items: list, length: int):
        self._items = items
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            if step == 1:
                return self._items[start:stop]
            # indices() may give -1 as a backward stop ("before 0"): the longer list would read it as its end
            return [self._items[i] for i in range(start, stop, step)]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("index out of range")
        return self._items[index]

    def __iter__(self):
        return islice(self._items, self._length)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == self._length and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._items[:self._length])
