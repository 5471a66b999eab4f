"""One error type for everything a user can get wrong.

Every user-facing failure is a :class:`SlimformerError` that says *what* went wrong, *where* (a path,
a tensor name, a flag) and *how to fix it*. The CLI prints it on one line to stderr and exits non-zero;
library callers can catch it. Anything else escaping is a bug in slimformer.
"""

from __future__ import annotations


class SlimformerError(Exception):
    """A problem with the user's input or environment, with the fix spelled out."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"(at {self.where})")
        text = " ".join(parts)
        if self.fix:
            text += f". Fix: {self.fix}"
        return text
