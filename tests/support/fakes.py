"""Simple fake collaborators for unit tests of the web layer."""

from __future__ import annotations

from typing import Any


class Recorder:
    """Stands for an actor: records what it is told."""

    def __init__(self) -> None:
        self.told: list[object] = []

    def tell(self, message: object) -> None:
        self.told.append(message)


class BlueprintServices:
    """The services ``web.app.create_app`` needs, serving just the given blueprints."""

    def __init__(self, *blueprints: Any) -> None:
        self._blueprints = list(blueprints)

    def health(self) -> bool:
        return True

    def blueprints(self) -> list[Any]:
        return self._blueprints
