"""Access lines written in batches, in the same format as the rest of the log.

One ``logging`` record per request was the largest single cost of a cache
hit in ``bench/`` (a record, a formatter, ``localtime``/``strftime``, a lock
and a ``write`` plus ``flush`` syscall, about a third of the request). This
writer keeps the format the CLI's logging uses
(``%(asctime)s %(levelname)s %(name)s: %(message)s``), stamps the time once
per second, and writes what accumulated as one ``write`` when 32 KiB are
waiting or half a second after the first waiting line, whichever comes first;
nginx's ``access_log ... buffer= flush=`` does the same. Lines still waiting
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
from typing import TextIO

log = logging.getLogger("gateway")


class LineBuffer:
    def __init__(
        self,
        stream: TextIO,
        *,
        logger_name: str = "gateway.access",
        max_bytes: int = 32 * 1024,
        max_delay: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
        self._tag = f" INFO {logger_name}: "
        self._max_bytes = max_bytes
        self._max_delay = max_delay
        self._clock = clock
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        self._closed = False
        atexit.register(self.flush)  # an exit that skips the lifespan's close still writes what waits

    def add(self, message: str) -> None:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = f"{self._stamp},{int((now - second) * 1000):03d}{self._tag}{message}\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max_bytes or self._closed:
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
        text = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self._stream.write(text)
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
