"""A replica whose wall clock is off: with this directory on PYTHONPATH, Python imports this
module at start-up, and ``time.time`` runs ``SKEWED_CLOCK_SECONDS`` ahead (negative: behind),
as on a node whose clock drifted. Monotonic clocks are left alone: they never compare across
machines."""

from __future__ import annotations

import os
import time

_offset = float(os.environ.get("SKEWED_CLOCK_SECONDS", "0"))
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _offset
time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
