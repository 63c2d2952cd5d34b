"""`with`-statement support for the I/O edges (sockets, devices, stores) that have close().

One base class instead of the same `__enter__`/`__exit__` pair in every edge; nothing else.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """`with X(...) as x:` returns x and calls x.close() on the way out (never suppresses)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
