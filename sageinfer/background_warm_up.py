"""A start-up warm-up in a thread of its own, so that start-up goes on meanwhile (the memory profile,
the cache allocation): the attention kernels' (attention/kernel_warm_up.py) and the quantized layers'
(executor/linear_warm_up.py)."""
from __future__ import annotations

import threading
from typing import Callable


def in_background(work: Callable[[threading.Event], None], again: Callable[[], None], name: str,
                  enter_thread: Callable[[], None] = lambda: None) -> Callable[[bool], None]:
    """Start work(cancelled) in a thread; the finish() returned waits for it, raises its error and
    runs again() from the caller's thread (launches whose compiles are now in memory). finish(cancel=
    True), for a start-up that failed: sets `cancelled` (work skips what it has not begun), waits,
    raises nothing and runs nothing again."""
    errors, cancelled = [], threading.Event()

    def body():
        try:
            enter_thread()
            work(cancelled)
        except BaseException as error:  # noqa: BLE001 - handed to finish()
            errors.append(error)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()

    def finish(cancel: bool = False):
        if cancel:
            cancelled.set()
        thread.join()
        if cancel:
            return
        if errors:
            raise errors[0]
        again()
    return finish


def finish_all(finishes: list[Callable[[bool], None]], cancel: bool = False) -> None:
    """Wait for every background warm-up's finish (none may still launch when the graphs' capture
    starts), then raise the first one's error."""
    errors = []
    for finish in finishes:
        try:
            finish(cancel)
        except Exception as error:  # noqa: BLE001 - raised after the others have finished
            errors.append(error)
    if errors:
        raise errors[0]
