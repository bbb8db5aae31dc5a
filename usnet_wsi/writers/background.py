"""Run a writer off the main loop: items go through a bounded queue to one writer thread.

The producer never waits for serialisation unless the queue is full (bounded memory). An error
in the writer thread is raised again in the producer at its next `put` or at `close`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    """`consume(item)` called in order, in one thread, for every item `put`."""

    def __init__(self, consume: Callable[[Any], None], max_items: int = 64,
                 name: str = "usnet-write") -> None:
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_items))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as err:  # noqa: BLE001 - raised again in the producer
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def put(self, item: Any) -> None:
        """Queue one item (waits while the queue is full); raises the writer's error if any."""
        self._raise()
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():
                    raise RuntimeError("the writer thread stopped") from None

    def close(self) -> None:
        """Wait until every queued item is written; raises the writer's error if any."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the item in progress; queued items are dropped, errors ignored."""
        self._error = self._error or RuntimeError("aborted")
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_STOP)
        self._thread.join()
        self._error = None

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
