"""Keep the gateway's resident memory close to what its peers need (glibc malloc tuning).

CPython hands its small-object arenas back to the kernel once they empty, but glibc's malloc
keeps the freed chunks of larger objects (dict tables, device dumps, SQLite rows) in its heaps:
after a reconcile or a sweep of 100 000 peers that is ~15 MB that stays resident for nothing.
`trim()` gives them back (malloc_trim; ~1.5 ms with 100 000 installed peers). `tune()`, called
before any thread starts, caps the number of malloc arenas (glibc makes up to 8 per core, one
per thread that meets contention, and each keeps its own free memory) and fixes the mmap
threshold (glibc otherwise raises it after every large free, so the next large dump buffers
come from a heap instead of a mapping that is returned on free).

Both are no-ops where the C library is not glibc (musl returns memory itself).
"""

from __future__ import annotations

import ctypes
from typing import Final

_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8
ARENA_MAX: Final = 2
MMAP_THRESHOLD: Final = 256 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC: Final = _glibc()


def tune() -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
