"""Progress of long work that runs where no terminal is (a server's model build), as log lines.

Building a model on a GPU captures one CUDA graph per slot and bucket, and the first ones
autotune every kernel for their shape: a minute or two on a cold card, silent until now.
``Progress`` logs how far it has come at most every ``every_s`` seconds, and once at the
end, so an operator watching the log (or a probe that is not ready yet) knows it moves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("recserve.engine")


class Progress:
    """Counts ``total`` steps of ``what``; ``step`` after each one."""

    def __init__(self, what: str, total: int, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.every_s, self.clock = what, total, every_s, clock
        self.done = 0
        self.started = self._last = clock()

    def step(self, detail: str = "") -> None:
        """One more step done (``detail``: which, for the log line)."""
        self.done += 1
        now = self.clock()
        if self.done == self.total:
            log.info("%s: %d/%d done in %.1f s", self.what, self.done, self.total,
                     now - self.started)
        elif now - self._last >= self.every_s:
            self._last = now
            log.info("%s: %d/%d%s, %.0f s so far", self.what, self.done, self.total,
                     f" ({detail})" if detail else "", now - self.started)
