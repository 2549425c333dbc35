"""The scheduler's waiting queue, by the scheduling policy.

fcfs: arrival order; a preempted request goes back to the front.
priority: the lowest `priority` value first (vLLM's convention), then arrival; a preempted request goes
back in by the same key, ahead of anything of its priority that arrived after it.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque

POLICIES = ("fcfs", "priority")


def priority_key(request) -> tuple:
    return (request.priority, request.arrival_time)


class FcfsQueue:
    def __init__(self):
        self._items: deque = deque()

    def add(self, request) -> None:
        self._items.append(request)

    def add_front(self, request) -> None:
        """A preempted or resumed request: first in line again."""
        self._items.appendleft(request)

    def peek(self):
        return self._items[0]

    def pop(self):
        return self._items.popleft()

    def remove(self, request) -> None:
        self._items.remove(request)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request) -> bool:
        return request in self._items

    def __iter__(self):
        return iter(self._items)


class PriorityQueue:
    def __init__(self):
        self._heap: list = []
        self._order = itertools.count()  # ties (siblings of one request) leave in the order they came

    def add(self, request) -> None:
        heapq.heappush(self._heap, (priority_key(request), next(self._order), request))

    add_front = add  # its key keeps its place

    def peek(self):
        return self._heap[0][2]

    def pop(self):
        return heapq.heappop(self._heap)[2]

    def remove(self, request) -> None:
        self._heap = [entry for entry in self._heap if entry[2] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, request) -> bool:
        return any(entry[2] is request for entry in self._heap)

    def __iter__(self):
        return (entry[2] for entry in sorted(self._heap, key=lambda e: e[:2]))


def make_queue(policy: str):
    if policy == "fcfs":
        return FcfsQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"scheduling_policy {policy!r}: choose one of {', '.join(POLICIES)}")
