"""Kinds of bad records, the error raised for them under ``strict=True``, the rate-limited skip
warning, argument checks."""

from __future__ import annotations

import logging
import time

# Order fixes the layout of the collator's ``n_skipped`` counter tensor (and the ``skipped_<kind>``
# metrics). Every kind but ``truncated`` is a dropped record; ``truncated`` records were cut to
# ``max_length`` (``truncation="truncate"``) and kept, and are counted so the cut is never silent.
SKIP_KINDS = ("missing_image", "corrupt_image", "malformed", "no_assistant", "too_long",
              "bad_text", "image_too_large", "truncated")


class BadRecordError(ValueError):
    """A record that cannot become a training sample; ``kind`` is one of ``SKIP_KINDS``."""

    def __init__(self, kind: str, message: str):
        if kind not in SKIP_KINDS:
            raise ValueError(f"kind must be one of {SKIP_KINDS}, got {kind!r}")
        # Records may hold lone surrogates; keep the message printable in any log.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self):
        # Keep the two-argument constructor when the error crosses a DataLoader worker boundary.
        return type(self), (self.kind, self.message)


class SkipWarnings:
    """Warn about skipped records without flooding the log: the first record of each kind at once,
    then at most one line per kind every ``interval`` seconds, saying how many were skipped since."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0):
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def warn(self, where: str, error: BadRecordError, action: str = "skipping") -> None:
        now = time.monotonic()
        kind = error.kind
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._since[kind] = self._since.get(kind, 0) + 1
            return
        since = self._since.pop(kind, 0)
        self._last[kind] = now
        more = f" ({since} more {kind} records since the last warning)" if since else ""
        self.logger.warning("%s %s: %s%s", action, where, error, more)


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise ValueError naming the argument unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
