"""Long-running components (pipeline, API, simulator) and command groups plug into ``cityops`` by entry point.

The core package imports none of them (dependencies point one way); each component package
declares itself in the ``cityops.components`` entry-point group, and ``cityops`` discovers it: it
becomes a subcommand (``cityops pipeline``) and a part of ``cityops up``. Packages add one-shot
command groups (``cityops rules load-defaults``) the same way, in ``cityops.commands``.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

from cityops.catalogue import Catalogue
from cityops.errors import ConfigError
from cityops.settings import Settings

GROUP = "cityops.components"
COMMANDS_GROUP = "cityops.commands"


@dataclass(frozen=True, slots=True)
class Services:
    database_url: str
    mqtt_url: str
    # The embedded broker (rumqttd) cannot keep a persistent session on a shared subscription, and
    # runs one pipeline anyway: components subscribe without ``$share`` there.
    shared_subscriptions: bool = True
    mqtt_v311_url: str | None = None  # where MQTT 3.1.1 clients connect, when that is elsewhere

    @property
    def mqtt_url_v311(self) -> str:
        return self.mqtt_v311_url or self.mqtt_url


class Component(Protocol):
    name: str
    help: str
    order: int  # start order in `cityops up`: lower first

    def describe(self, settings: Settings, services: Services) -> str:
        """One banner line: what runs where."""
        ...

    async def run(
        self, settings: Settings, catalogue: Catalogue, services: Services, stop: asyncio.Event
    ) -> None:
        """Run until ``stop`` is set, then shut down gracefully and return."""
        ...


def enabled(component: Component, settings: Settings) -> bool:
    """Whether ``cityops up`` runs it: a component may say no (the demo runs only with --demo)."""
    check = getattr(component, "enabled", None)
    return True if check is None else bool(check(settings))


def discover() -> list[Component]:
    found: list[Component] = []
    for entry in entry_points(group=GROUP):
        component = entry.load()
        if not all(hasattr(component, attr) for attr in ("name", "run", "describe", "order", "help")):
            raise ConfigError(f"entry point {entry.name} in {GROUP} is not a cityops component")
        found.append(component)
    return sorted(found, key=lambda c: (c.order, c.name))


class CommandPlugin(Protocol):
    """A one-shot command group from another package (``cityops rules …``), by entry point."""

    name: str
    help: str

    def configure(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's arguments and subcommands."""
        ...

    async def run(self, args: argparse.Namespace, settings: Settings, catalogue: Catalogue) -> int:
        """Do it; the exit status."""
        ...


def discover_commands() -> list[CommandPlugin]:
    found: list[CommandPlugin] = []
    for entry in entry_points(group=COMMANDS_GROUP):
        plugin = entry.load()
        if not all(hasattr(plugin, attr) for attr in ("name", "help", "configure", "run")):
            raise ConfigError(f"entry point {entry.name} in {COMMANDS_GROUP} is not a cityops command")
        found.append(plugin)
    return sorted(found, key=lambda p: p.name)
