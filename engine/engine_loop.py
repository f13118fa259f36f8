"""The engine thread: owns one LLMEngine, takes requests and aborts from other threads, steps while there is work.
The steps themselves run on the process's kernel thread (engine/runtime.py), shared by every model served.

Every other thread talks to it only through submit() and abort(), which are thread-safe; outputs leave through each
request's own callback, called on this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from engine.engine import LLMEngine, StepStats
from engine.request import Request
from engine.runtime import run_on_kernel_thread

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The admission queue is full; the caller should retry later."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_queue: int, on_step: Callable[[StepStats], None] | None = None,
                 name: str = "engine") -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counters below, read by any thread
        self._num_pending = 0  # submitted, not yet handed to the engine
        self._num_waiting = 0  # engine's waiting queue, as of the last step
        self._num_running = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._num_waiting + self._num_pending

    @property
    def num_running(self) -> int:
        with self._lock:
            return self._num_running

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFullError when max_queue requests are already waiting. Any thread."""
        with self._lock:
            if self._num_waiting + self._num_pending >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._num_pending += 1
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        """Abort a request at the next step boundary and free its blocks. Any thread."""
        self._inbox.put(("abort", request_id))

    def stop(self, timeout_s: float | None = None) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._drain_inbox(block=not self.engine.has_work) and not self.engine.has_work:
                self._publish(self.engine.snapshot())  # e.g. the last running request was aborted
            if self.engine.has_work:
                self._publish(run_on_kernel_thread(self.engine.step))

    def _publish(self, stats: StepStats) -> None:
        with self._lock:
            self._num_waiting = stats.num_waiting
            self._num_running = stats.num_running
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:  # an observer's bug must not stop serving
                logger.exception("step observer failed")

    def _drain_inbox(self, block: bool) -> bool:
        """Handle every queued command; True if there was any."""
        handled = False
        try:
            command, payload = self._inbox.get(block=block, timeout=0.5 if block else None)
            while True:
                self._handle(command, payload)
                handled = True
                command, payload = self._inbox.get_nowait()
        except queue.Empty:
            return handled

    def _handle(self, command: str, payload: object) -> None:
        if command == "add":
            assert isinstance(payload, Request)
            with self._lock:
                self._num_pending -= 1
                self._num_waiting += 1
            try:
                self.engine.add_request(payload)
            except Exception as exc:  # rejected after queueing: tell the request, keep serving
                logger.warning("request %s rejected: %s", payload.request_id, exc)
                with self._lock:
                    self._num_waiting -= 1
                self.engine.fail(payload, str(exc))
        elif command == "abort":
            assert isinstance(payload, str)
            self.engine.abort(payload)
