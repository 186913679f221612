"""Who runs now and who waits: a first-come queue in front of the model, with positions users can see.

Gradio's own queue shows a waiting user nothing useful in small outputs and cannot cancel a queued job
from a Stop button. The web app therefore admits every event at once and puts each generation through
:class:`Slots`: up to ``capacity`` run together (1 for a local model; a remote server that batches takes
more), the rest wait in order and can see their place and leave the line.
"""

from __future__ import annotations

import itertools
import threading


class Slots:
    """A FIFO of tickets; the first ``capacity`` run."""

    def __init__(self, capacity: int = 1) -> None:
        self._cond = threading.Condition()
        self._capacity = max(1, int(capacity))
        self._running: set[int] = set()
        self._waiting: list[int] = []
        self._ids = itertools.count(1)

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        with self._cond:
            self._capacity = max(1, int(value))
            self._admit()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self._capacity:
            self._running.add(self._waiting.pop(0))
        self._cond.notify_all()

    def enter(self) -> int:
        """Join the line; returns the ticket."""
        with self._cond:
            ticket = next(self._ids)
            self._waiting.append(ticket)
            self._admit()
            return ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        """True once ``ticket`` may run; False if it still waits after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: ticket in self._running, timeout)

    def position(self, ticket: int) -> tuple[int, int]:
        """(place in line from 1, people waiting); (0, n) once running."""
        with self._cond:
            if ticket in self._running:
                return 0, len(self._waiting)
            return self._waiting.index(ticket) + 1, len(self._waiting)

    def leave(self, ticket: int) -> None:
        """Done, or gave up waiting: free the slot or the place in line."""
        with self._cond:
            self._running.discard(ticket)
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._admit()

    def busy(self) -> int:
        with self._cond:
            return len(self._running)
