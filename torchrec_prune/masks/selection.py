"""FQN pattern selection shared by ``wrap()`` and the pruners' targets."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field


def is_exact(pattern: str) -> bool:
    """Whether ``pattern`` names one module (no fnmatch wildcard)."""
    return not any(ch in pattern for ch in "*?[")


@dataclass
class FqnSelection:
    """Modules chosen by fnmatch patterns over their FQNs.

    Args:
        include: a module is selected when it matches one of these.
        exclude: patterns that veto ``include``.
    """

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                owner = type(self).__name__
                raise TypeError(f"{owner}.{name} must be a list of fnmatch patterns, got {value!r}")

    def selects(self, fqn: str) -> bool:
        return any(fnmatch.fnmatchcase(fqn, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(fqn, p) for p in self.exclude
        )
