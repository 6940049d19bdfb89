"""Kinds of bad records, the error raised for them under ``strict=True``, argument checks."""

from __future__ import annotations

# Order fixes the layout of the collator's ``n_skipped`` counter tensor.
SKIP_KINDS = ("missing_image", "corrupt_image", "malformed", "no_assistant", "too_long")


class BadRecordError(ValueError):
    """A record that cannot become a training sample; ``kind`` is one of ``SKIP_KINDS``."""

    def __init__(self, kind: str, message: str):
        if kind not in SKIP_KINDS:
            raise ValueError(f"kind must be one of {SKIP_KINDS}, got {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self):
        # Keep the two-argument constructor when the error crosses a DataLoader worker boundary.
        return type(self), (self.kind, self.message)


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise ValueError naming the argument unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
