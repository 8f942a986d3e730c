"""Rule specs: valid ones load from YAML and JSON; invalid ones are refused with a precise message."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.catalogue import load_default_catalogue
from rules.spec import Composite, RuleSpecError, Threshold, load_rules, parse_rules

CATALOGUE = load_default_catalogue()

PONDING = {
    "name": "ponding-road-closure",
    "severity": "high",
    "selector": {"kinds": ["ponding_gauge"]},
    "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 25, "clear": 20},
    "source": "Shenyang road closure at 25 cm ponding (news, 2015); see reference D2",
}


def test_a_valid_rule_parses() -> None:
    (spec,) = parse_rules([PONDING], CATALOGUE)
    assert isinstance(spec.condition, Threshold) and spec.condition.clear == 20
    assert spec.metrics() == {"ponding_depth"}


def test_composite_over_metrics_of_a_site() -> None:
    rule = {
        "name": "rainstorm-and-ponding",
        "severity": "critical",
        "source": "CMA signals + D2",
        "condition": {
            "type": "all",
            "scope": "district",
            "conditions": [
                {
                    "type": "window",
                    "metric": "rainfall",
                    "agg": "sum",
                    "window_s": 10800,
                    "op": ">=",
                    "value": 50,
                },
                {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15},
            ],
        },
    }
    (spec,) = parse_rules({"rules": [rule]}, CATALOGUE)
    assert isinstance(spec.condition, Composite) and spec.metrics() == {"rainfall", "ponding_depth"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"condition": {**PONDING["condition"], "clear": 30}},
            "clear (30.0) must be at or below value (25.0)",
        ),
        ({"condition": {**PONDING["condition"], "op": "~"}}, "condition.threshold.op"),
        (
            {"condition": {"type": "range", "metric": "ph", "low": 9, "high": 6}},
            "low (9.0) must be below high",
        ),
        ({"condition": {"type": "sometimes"}}, "does not match any of the expected tags"),
        ({"condition": {**PONDING["condition"], "metric": "ponding"}}, "unknown metric 'ponding'"),
        ({"selector": {"kinds": ["submarine"]}}, "unknown device kind 'submarine'"),
        ({"severity": "apocalyptic"}, "severity"),
        ({"source": ""}, "source"),
        ({"name": "Has Spaces"}, "name"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
        ({"condition": {"type": "no_data", "after_s": 0}}, "after_s"),
    ],
)
def test_invalid_specs_say_what_is_wrong(change: dict[str, object], message: str) -> None:
    with pytest.raises(RuleSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rules([{**PONDING, **change}], CATALOGUE)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(RuleSpecError, match="used twice"):
        parse_rules([PONDING, PONDING], CATALOGUE)


def test_load_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "pack.yaml"
    yaml_file.write_text(
        "rules:\n"
        "  - name: lel-alarm\n"
        "    severity: high\n"
        "    source: GB/T 50493-2019 5.5.2 (level 1 <= 25 %LEL); utility tunnel 20 %LEL\n"
        "    condition: {type: threshold, metric: combustible_gas_lel, op: '>=', value: 20, for_s: 10}\n"
    )
    (spec,) = load_rules(yaml_file, CATALOGUE)
    assert spec.name == "lel-alarm"
    json_file = tmp_path / "pack.json"
    json_file.write_text(
        '[{"name": "x", "severity": "low", "source": "s", "condition": {"type": "no_data", "after_s": 900}}]'
    )
    assert load_rules(json_file, CATALOGUE)[0].condition.type == "no_data"
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [unclosed")
    with pytest.raises(RuleSpecError, match="not valid YAML"):
        load_rules(broken, CATALOGUE)
