"""The engine's log output: one line per event, written by a thread of its own.

Every message costs the event loop a few log lines (queued, delivered). A plain
``StreamHandler`` would write and flush each on the loop; the standard
``QueueHandler``/``QueueListener`` pair copies each record and formats it twice. Here
the caller's thread only renders the message text (its arguments may change after the
call) and queues a tuple; the writer thread stamps the time and writes whatever queued
up meanwhile with one write and one flush. A line after a quiet spell is written at
once; lines that follow a write within ``INTERVAL`` (50 ms) wait for the rest of it:
under load the thread writes 20 times a second, not once per line (a wake-up per line
cost the engine's process a context switch per message). Line format, as before:
``2026-12-02 10:01:57,123 INFO mailbox_guard.engine: text``.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import TextIO


def lean_records() -> None:
    """Log records without what no line of ours shows: the caller's file and line
    (found by walking the stack on every call), thread, process and task names."""
    logging._srcfile = None          # documented switch in logging/__init__.py: no findCaller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):      # Python 3.12+
        logging.logAsyncioTasks = False


class LineWriter(logging.Handler):
    """A handler whose lines reach ``stream`` from a thread of its own, in batches."""

    MAX_BATCH = 20000
    INTERVAL = 0.05

    def __init__(self, stream: TextIO | None = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.stream = stream if stream is not None else sys.stderr
        self._lines: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="log-writer", daemon=True)
        self._stopping = threading.Event()
        self._second = -1
        self._stamp = ""
        self.lost = 0          # lines the stream refused; said on the next line that gets through

    def start(self) -> "LineWriter":
        self._thread.start()
        return self

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.stack_info:
                text += "\n" + record.stack_info
            self._lines.put((record.created, record.levelname, record.name, text))
        except Exception:
            self.handleError(record)

    def stop(self) -> None:
        """Every line queued so far is written before this returns."""
        if self._thread.is_alive():
            self._lines.put(None)
            self._stopping.set()
            self._thread.join()

    def _main(self) -> None:
        last_write = -self.INTERVAL
        while True:
            first = self._lines.get()
            # Lines close on the heels of the last write wait for the rest of the
            # interval (and whatever else comes meanwhile): one wake-up and one write
            # per interval under load, not one per line. (stop() cuts the pause short:
            # the engine's exit never waits for it.)
            since = time.monotonic() - last_write
            if first is not None and since < self.INTERVAL:
                self._stopping.wait(self.INTERVAL - since)
            batch = [first]
            while first is not None and len(batch) < self.MAX_BATCH:
                try:
                    item = self._lines.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                if item is None:
                    break
            out = [self._line(item) for item in batch if item is not None]
            if out:
                if self.lost:
                    out.insert(0, self._line((time.time(), "ERROR", "mailbox_guard.logs",
                                              f"{self.lost} log line(s) lost: the log stream refused them")))
                try:
                    self.stream.write("".join(out))
                    self.stream.flush()
                    self.lost = 0
                except (OSError, ValueError):       # stderr closed or full: lines are lost, not the engine
                    self.lost += len(out)
            last_write = time.monotonic()
            if batch[-1] is None:
                return

    def _line(self, item: tuple) -> str:
        created, level, name, text = item
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((created - second) * 1000):03d} {level} {name}: {text}\n"
