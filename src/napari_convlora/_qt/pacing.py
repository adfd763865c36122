"""How often the dock redraws its progress while a job runs.

Each redraw repaints the napari window, and a window that holds napari's OpenGL canvas is recomposed
whole: under a GPU driver that costs a millisecond or two, under software OpenGL (llvmpipe: remote
desktops, VMs, Xvfb) 20-60 ms of CPU, taken from training on a small machine. The pacer measures what
the GUI thread actually spends (its own CPU time between redraws) and spaces redraws so that this stays
within a small share of the wall time: every two to three seconds with software rendering (measured
under Xvfb), more often where a GPU composes the window, and less often while the user is busy in the
viewer.
"""

from __future__ import annotations

import time

MIN_MS = 500
MAX_MS = 3000
#: The GUI thread's CPU time the live display may take, as a fraction of wall time.
GUI_CPU_BUDGET = 0.01


def next_interval_ms(gui_cpu_s: float, wall_s: float, current_ms: float) -> int:
    """The next redraw interval, given the GUI thread's CPU time ``gui_cpu_s`` over the last
    ``wall_s`` seconds (which held one redraw). Half-way from ``current_ms`` towards the interval at
    which one redraw's cost is ``GUI_CPU_BUDGET`` of the wall time, within ``MIN_MS..MAX_MS``."""
    if wall_s <= 0 or gui_cpu_s < 0:
        return int(current_ms)
    wanted = 1000.0 * gui_cpu_s / GUI_CPU_BUDGET
    return int(min(MAX_MS, max(MIN_MS, 0.5 * (current_ms + wanted))))


class RefreshPacer:
    """Call :meth:`tick` at each redraw (on the GUI thread); it returns the interval until the next."""

    def __init__(self, initial_ms: int = 1000) -> None:
        self.interval_ms = initial_ms
        self.last: tuple[float, float] | None = None

    def reset(self) -> None:
        """A new job: measure afresh (the time since the last job's redraw is not a redraw's cost)."""
        self.last = None

    def tick(self) -> int:
        now = (time.perf_counter(), time.thread_time())
        if self.last is not None:
            wall, cpu = now[0] - self.last[0], now[1] - self.last[1]
            self.interval_ms = next_interval_ms(cpu, wall, self.interval_ms)
        self.last = now
        return self.interval_ms
