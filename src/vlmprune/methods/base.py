"""The method interface: a named, documented schedule of pruning stages."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from vlmprune.stage import Stage

__all__ = ["Method"]


class Method(ABC):
    """A pruning method: a small dataclass whose fields are its parameters.

    Subclasses set `name` (the registry key) and `paper`, validate their fields in `__post_init__`, and
    build their schedule in `stages()`. A method knows nothing of the model it runs on.
    """

    name: ClassVar[str]
    paper: ClassVar[str]

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The pruning stages, in increasing layer order."""
