"""``python -m mailbox_guard ARGS`` under cProfile, timed by the CPU clock of its thread.

cProfile's default clock is the wall clock: on a busy machine, and with uvloop
(whose wait for events is C code that cProfile does not see), it charges idle and
pre-empted time to whatever Python function was last entered. ``time.thread_time``
counts only the CPU the event loop's thread spends in each function (the store's
writer thread is not profiled). The profile is written to OUT when the engine stops.

    python bench/profile_engine.py OUT serve --inbound 127.0.0.1:2525
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = sys.argv[1]
    sys.argv = ["mailbox_guard", *sys.argv[2:]]
    prof = cProfile.Profile(time.thread_time)
    code = 0
    try:
        prof.runcall(runpy.run_module, "mailbox_guard", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        prof.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
