"""Access lines written in batches, in the same format as the rest of the log.

One ``logging`` record per request was the largest single cost of a cache
hit in ``bench/`` (a record, a formatter, ``localtime``/``strftime``, a lock
and a ``write`` plus ``flush`` syscall, about a third of the request). This
writer keeps the format the CLI's logging uses
(``%(asctime)s %(levelname)s %(name)s: %(message)s``), stamps the time once
per second, and writes what accumulated as one ``write`` when 256 lines are
waiting or half a second after the first waiting line, whichever comes first;
nginx's ``access_log ... buffer= flush=`` does the same. A line can also be
handed over unformatted (``add_later``): the formatting then happens in the
batch, in one tight loop, instead of between each answer's TLS and syscall
work, where it cost several times more in ``bench/``. Lines still waiting
are written when the gateway stops (the app's lifespan calls ``close``; after
that, lines are written one by one) or when the interpreter exits; a process
killed outright loses at most the last half second of access lines.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("gateway")
_MILLIS = [f"{ms:03d}" for ms in range(1000)]  # the ",mmm" of logging's asctime, made once


class LineBuffer:
    def __init__(
        self,
        stream: TextIO,
        *,
        logger_name: str = "gateway.access",
        max_lines: int = 256,
        max_delay: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
        self._tag = f" INFO {logger_name}: "
        self._max_lines = max_lines
        self._max_delay = max_delay
        self._clock = clock
        # (time, format, args): the line is format(*args), made when the batch is written.
        self._lines: list[tuple[float, Callable[..., str], tuple[Any, ...]]] = []
        self._second = -1
        self._stamp = ""
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        self._closed = False
        atexit.register(self.flush)  # an exit that skips the lifespan's close still writes what waits

    def add(self, message: str) -> None:
        self.add_later(str, message)

    def add_later(self, format: Callable[..., str], *args: Any) -> None:
        """Queue the line ``format(*args)``, stamped now; ``args`` must not change afterwards."""
        self._lines.append((self._clock(), format, args))
        if len(self._lines) >= self._max_lines or self._closed:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._max_delay, self.flush)
            except RuntimeError:  # no loop (a synchronous caller): write now
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        batch, self._lines = self._lines, []
        out: list[str] = []
        tag = self._tag
        for now, format, args in batch:
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(second))
            try:
                message = format(*args)
            except Exception as exc:
                message = f"(access line not formatted: {exc!r})"
            out += (self._stamp, _MILLIS[int((now - second) * 1000)], tag, message, "\n")
        try:
            self._stream.write("".join(out))
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a full disk or a closed stream must not fail requests
            if not self._failed:
                self._failed = True
                log.error("access log lines could not be written (%s); further failures are not reported", exc)

    def close(self) -> None:
        """Write what waits; lines added later (requests finishing after shutdown) are written at once."""
        self._closed = True
        self.flush()
        atexit.unregister(self.flush)
