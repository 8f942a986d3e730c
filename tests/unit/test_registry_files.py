from __future__ import annotations

import pytest

from cityops.catalogue import load_default_catalogue
from cityops.errors import ImportFileError
from cityops.registry import FileFormat, parse_fleet

CATALOGUE = load_default_catalogue()
HEADER = "external_id,tenant,kind,name,lat,lon,district,tags,parent\n"


def test_csv_fleet() -> None:
    text = HEADER + (
        "gw-1,water,edge_gateway,Gateway 1,23.12,113.26,yuexiu,,\n"
        "wq-1,water,water_quality_station,Plant outlet,23.13,113.27,yuexiu,zone=2;site=plant,gw-1\n"
    )
    specs = parse_fleet(text, FileFormat.CSV, CATALOGUE)
    assert [s.external_id for s in specs] == ["gw-1", "wq-1"]
    assert specs[1].tags == {"zone": "2", "site": "plant"} and specs[1].parent == "gw-1"
    assert specs[0].lat == 23.12 and specs[0].tags == {}


def test_minimal_header_and_blank_lines() -> None:
    text = "external_id,tenant,kind,name,lat,lon,district\n\npd-1,water,ponding_gauge,Tunnel,,,tianhe\n"
    (spec,) = parse_fleet(text, FileFormat.CSV, CATALOGUE)
    assert spec.lat is None and spec.district == "tianhe"


def test_every_bad_line_is_reported_by_number() -> None:
    text = HEADER + (
        "ok-1,water,pressure_logger,P1,23.1,113.2,yuexiu,,\n"
        "bad id,water,pressure_logger,P2,23.1,113.2,yuexiu,,\n"
        "ok-2,water,no_such_kind,P3,23.1,113.2,yuexiu,,\n"
        "ok-3,water,pressure_logger,P4,123.1,113.2,yuexiu,,\n"
        "ok-1,water,pressure_logger,P5,23.1,113.2,yuexiu,,\n"
        "ok-4,water,pressure_logger,P6,23.1,113.2,yuexiu,novalue,\n"
        "ok-5,water,pressure_logger\n"
    )
    with pytest.raises(ImportFileError) as caught:
        parse_fleet(text, FileFormat.CSV, CATALOGUE)
    lines = [line for line, _ in caught.value.problems]
    assert lines == [3, 4, 5, 6, 7, 8]
    messages = dict(caught.value.problems)
    assert "external_id" in messages[3] and "unknown device kind" in messages[4] and "lat" in messages[5]
    assert "already on line 2" in messages[6] and "key=value" in messages[7]
    assert "line 3" in str(caught.value)


def test_bad_header() -> None:
    with pytest.raises(ImportFileError, match="missing column"):
        parse_fleet("external_id,tenant\nx,water\n", FileFormat.CSV, CATALOGUE)


def test_json_lines() -> None:
    text = (
        '{"external_id": "n-1", "tenant": "environment", "kind": "noise_monitor", "name": "N1",'
        ' "tags": {"zone_class": "2"}}\n'
        "\n"
        "not json\n"
        '{"external_id": "n-2", "tenant": "environment", "kind": "noise_monitor", "name": "N2", "colour": 1}\n'
    )
    with pytest.raises(ImportFileError) as caught:
        parse_fleet(text, FileFormat.JSONL, CATALOGUE)
    assert [line for line, _ in caught.value.problems] == [3, 4]
    good = text.splitlines()[0]
    (spec,) = parse_fleet(good, FileFormat.JSONL, CATALOGUE)
    assert spec.tags == {"zone_class": "2"}


def test_format_guess() -> None:
    assert FileFormat.guess("fleet.JSONL") is FileFormat.JSONL
    assert FileFormat.guess("fleet.csv") is FileFormat.CSV
