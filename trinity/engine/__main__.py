"""``python -m trinity.engine``: build the engine's native code for this machine ahead of any run
(trinity/engine/kernels.cpp: the one-row gemv and the native decode step, built by
trinity/engine/gemv.py), and say how long it took; silent where
it is built already (scripts/setup.sh runs this every time). Exit status 1 with a one-line
reason where it cannot be built (no C++ compiler): runs then use ``F.linear`` and torch ops."""

from __future__ import annotations

import logging
import sys
import time

from trinity.engine import gemv


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    if gemv.library_path().exists():
        return 0
    start = time.perf_counter()
    try:
        gemv.check_compiler()
        print(
            "building the engine's native kernels for this CPU (a minute or two, once)...",
            flush=True,
        )
        library = gemv.build()
    except Exception as error:  # the compiler's output is long: its first line says what failed
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        print(f"native kernels not built ({reason}): decoding uses torch ops", file=sys.stderr)
        return 1
    print(f"native kernels built in {time.perf_counter() - start:.1f} s: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
