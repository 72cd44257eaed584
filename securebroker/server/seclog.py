"""Security events in the log, without letting one noisy client flood it.

Refusals and denials are logged with their specific reasons (peers never see them). A client
retrying a forbidden publish in a loop would otherwise write one line per attempt, so repeats of
the same (who, what) within ``window`` seconds are counted and summarised in the next line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("securebroker.security")


class SecurityLog:
    def __init__(
        self,
        *,
        window: float = 10.0,
        max_keys: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self._monotonic = monotonic
        self._log = logger
        #: (kind, who, reason) -> (window start, repeats suppressed since)
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def refused(self, peer: str, reason: str) -> None:
        self._emit("refused", peer, reason, "refused %s: %s", peer)

    def denied(self, peer: str, principal: str, reason: str) -> None:
        self._emit("denied", principal, reason, "denied %s (%s): %s", principal, peer)

    def _emit(self, kind: str, who: str, reason: str, fmt: str, *args: str) -> None:
        now = self._monotonic()
        key = (kind, who, reason)
        start, suppressed = self._seen.get(key, (-float("inf"), 0))
        if now - start < self.window:
            self._seen[key] = (start, suppressed + 1)
            return
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if suppressed:
            self._log.warning(fmt + " (and %d more like it)", *args, reason, suppressed)
        else:
            self._log.warning(fmt, *args, reason)
