"""Keep freed memory mapped, so a valued step's large buffers are reused instead of page-faulted in.

Why: glibc serves every allocation above 32 MB with a fresh `mmap` and gives it back with `munmap`
on free. A valued step allocates and frees several `[n, V, d]` and `[tokens, V]` buffers (hundreds
of MB each), so every step page-faults them in from scratch: in the copyright experiment on 2 CPU
cores the kernel time equalled the compute time. With mmap and trimming off, freed blocks stay in
the heap and the next step reuses them (`benchmarks/valuer_step.py`: values() 12.95 s -> 6.25 s
per step; docs/benchmarks.md).
The price: the process no longer hands freed memory back, so its peak RSS is higher (demo 2.55 ->
3.4 GB, copyright experiment 5.8 -> 9.3 GB).

glibc reads these settings only at process start (and `mallopt` cannot set a trim threshold above
2 GB), so the `attribution` command re-executes itself once with them for its heavy commands.
Library users can export the same variables. `ATTRIBUTION_MALLOC=default` turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

HEAVY_COMMANDS = {"run", "demo", "experiment", "curate"}
GLIBC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def wants_reexec(argv: list[str], env: dict[str, str]) -> bool:
    """A heavy command on glibc whose allocator settings are not yet in place."""
    if env.get("ATTRIBUTION_MALLOC", "").lower() == "default" or sys.platform != "linux":
        return False
    if platform.libc_ver()[0] != "glibc" or all(env.get(k) == v for k, v in GLIBC_ENV.items()):
        return False
    return bool(argv) and argv[0] in HEAVY_COMMANDS


def reexec_with_reusing_malloc(argv: list[str], module: str = "attribution.cli") -> None:
    """Replace this process by `python -m MODULE ARGV` with `GLIBC_ENV` set (heavy commands only)."""
    if not wants_reexec(argv, dict(os.environ)):
        return
    env = {**os.environ, **GLIBC_ENV}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
