"""What a bench script does before it times anything: print the load average, and refuse a busy machine.

A ratio measured beside another job (the test suite, a training run) is not a result: the other job slows the two
sides unequally. `require_quiet_machine(force)` prints the 1-, 5- and 15-minute load averages and stops the script
when the 1-minute one is above `limit` (1.0 on these 2-core machines), unless `force`.
"""

from __future__ import annotations

import os


def load_line() -> str:
    """The load averages and the CPU count, as the bench tables print them."""
    a = os.getloadavg()
    return f"load average {a[0]:.2f} {a[1]:.2f} {a[2]:.2f} (1, 5, 15 min), {os.cpu_count()} CPUs"


def require_quiet_machine(force: bool, limit: float = 1.0) -> float:
    """Print `load_line()`; exit naming `--force` if the 1-minute load is above `limit` and not `force`. Returns the
    1-minute load (the tables print it beside their results)."""
    print(load_line(), flush=True)
    load = os.getloadavg()[0]
    if load > limit and not force:
        raise SystemExit(f"refusing to time on a busy machine (1-min load average {load:.2f} > {limit}); "
                         "--force to run anyway")
    return load
