"""The engine's log writer: every line, in order, in the one format, written before
the process ends; exceptions keep their traceback."""

from __future__ import annotations

import io
import logging
import re
import time

from mailbox_guard.logs import LineWriter

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|ERROR) test\.logs: (.*)$")


def test_lines_in_order_in_the_format_and_all_written_by_stop():
    out = io.StringIO()
    writer = LineWriter(out).start()
    logger = logging.getLogger("test.logs")
    logger.addHandler(writer)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for i in range(3000):
            logger.info("line %d from=<%s>", i, "a@b.test")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        writer.stop()
        logger.removeHandler(writer)
    lines = out.getvalue().splitlines()
    matched = [LINE.match(line) for line in lines[:3001]]
    assert all(matched), lines[:3]
    assert [m.group(2) for m in matched[:3000]] == [f"line {i} from=<a@b.test>" for i in range(3000)]
    assert matched[3000].group(1) == "ERROR" and matched[3000].group(2) == "failed"
    assert lines[-1] == "ValueError: boom" and "Traceback (most recent call last):" in lines


def test_a_closed_stream_loses_lines_not_the_caller():
    out = io.StringIO()
    writer = LineWriter(out).start()
    out.close()
    record = logging.LogRecord("test.logs", logging.INFO, __file__, 1, "after close", None, None)
    writer.handle(record)
    writer.stop()          # returns: the writer thread did not die on the closed stream
    assert not writer._thread.is_alive()
    assert writer.lost == 1


def test_lost_lines_are_counted_on_the_next_line_that_gets_through():
    class Flaky(io.StringIO):
        fail = True

        def write(self, text):
            if self.fail:
                self.fail = False
                raise OSError("no space left on device")
            return super().write(text)

    out = Flaky()
    writer = LineWriter(out).start()
    writer.handle(logging.LogRecord("test.logs", logging.INFO, __file__, 1, "first", None, None))
    while writer.lost == 0:
        time.sleep(0.01)
    writer.handle(logging.LogRecord("test.logs", logging.INFO, __file__, 1, "second", None, None))
    writer.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("ERROR mailbox_guard.logs: 1 log line(s) lost: the log stream refused them")
    assert lines[1].endswith("INFO test.logs: second") and len(lines) == 2
