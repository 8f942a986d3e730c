from __future__ import annotations

import pytest

from cityops.topics import ParsedTopic, TopicKind, Topics

T = Topics("cityops")


def test_builders_follow_the_scheme() -> None:
    assert T.telemetry("aq-001") == "cityops/v1/aq-001/telemetry"
    assert T.status("aq-001") == "cityops/v1/aq-001/status"
    assert T.command("aq-001", "c1") == "cityops/v1/aq-001/cmd/c1"
    assert T.command_result("aq-001", "c1") == "cityops/v1/aq-001/cmd/c1/result"
    assert T.telemetry_filter("grp") == "$share/grp/cityops/v1/+/telemetry"
    assert T.status_filter() == "cityops/v1/+/status"
    assert T.device_prefix("aq-001") == "cityops/v1/aq-001/#"


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("cityops/v1/aq-001/telemetry", ParsedTopic(TopicKind.TELEMETRY, "aq-001")),
        ("cityops/v1/a.b_c-9/status", ParsedTopic(TopicKind.STATUS, "a.b_c-9")),
        ("cityops/v1/x/cmd/42", ParsedTopic(TopicKind.COMMAND, "x", "42")),
        ("cityops/v1/x/cmd/42/result", ParsedTopic(TopicKind.COMMAND_RESULT, "x", "42")),
    ],
)
def test_parse_round_trip(topic: str, parsed: ParsedTopic) -> None:
    assert T.parse(topic) == parsed


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/x/telemetry",
        "cityops/v2/x/telemetry",
        "cityops/v1/bad id/telemetry",
        "cityops/v1/" + "x" * 65 + "/telemetry",
        "cityops/v1/x/telemetry/extra",
        "cityops/v1/x/cmd",
        "cityops/v1/x/cmd/1/other",
        "cityops/v1//telemetry",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    assert T.parse(topic) is None
