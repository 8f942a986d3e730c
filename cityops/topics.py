"""The topic scheme of DESIGN §3: ``{root}/v1/{device_id}/telemetry|status|cmd/{command_id}[/result]``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cityops.model import DEVICE_ID_RE

VERSION = "v1"


class TopicKind(StrEnum):
    TELEMETRY = "telemetry"
    STATUS = "status"
    COMMAND = "cmd"
    COMMAND_RESULT = "result"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    device_id: str
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one root (``cityops`` in production; a unique root per test)."""

    root: str = "cityops"

    def telemetry(self, device_id: str) -> str:
        return f"{self.root}/{VERSION}/{device_id}/telemetry"

    def status(self, device_id: str) -> str:
        return f"{self.root}/{VERSION}/{device_id}/status"

    def command(self, device_id: str, command_id: str) -> str:
        return f"{self.root}/{VERSION}/{device_id}/cmd/{command_id}"

    def command_result(self, device_id: str, command_id: str) -> str:
        return f"{self.root}/{VERSION}/{device_id}/cmd/{command_id}/result"

    def device_prefix(self, device_id: str) -> str:
        """Everything one device may publish under (the broker ACL grants exactly this)."""
        return f"{self.root}/{VERSION}/{device_id}/#"

    def telemetry_filter(self, group: str | None = None) -> str:
        return self._shared(f"{self.root}/{VERSION}/+/telemetry", group)

    def status_filter(self, group: str | None = None) -> str:
        return self._shared(f"{self.root}/{VERSION}/+/status", group)

    @staticmethod
    def _shared(topic_filter: str, group: str | None) -> str:
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def parse(self, topic: str) -> ParsedTopic | None:
        """The parts of a topic of ours, or None for anything else (bad id, unknown suffix)."""
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != self.root or parts[1] != VERSION:
            return None
        device_id = parts[2]
        if DEVICE_ID_RE.match(device_id) is None:
            return None
        rest = parts[3:]
        if rest == ["telemetry"]:
            return ParsedTopic(TopicKind.TELEMETRY, device_id)
        if rest == ["status"]:
            return ParsedTopic(TopicKind.STATUS, device_id)
        if len(rest) in (2, 3) and rest[0] == "cmd" and rest[1]:
            if len(rest) == 2:
                return ParsedTopic(TopicKind.COMMAND, device_id, rest[1])
            if rest[2] == "result":
                return ParsedTopic(TopicKind.COMMAND_RESULT, device_id, rest[1])
        return None
