"""The `cityops` command end to end against a real database."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from cityops.cli import main


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> Path:
    monkeypatch.setenv("CITYOPS_DATABASE_URL", database_url)
    monkeypatch.setenv("CITYOPS_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_migrate_status_maintain(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "status"]) == 3  # pending migrations
    assert "not migrated yet" in capsys.readouterr().out
    assert main(["db", "migrate"]) == 0
    assert "applied 0002_readings (native)" in capsys.readouterr().out
    assert main(["db", "migrate"]) == 0
    assert "up to date: nothing to apply" in capsys.readouterr().out
    assert main(["db", "status"]) == 0
    assert "storage mode: native (no TimescaleDB)" in capsys.readouterr().out
    assert main(["db", "maintain"]) == 0
    assert "native storage: 9 partition(s) created" in capsys.readouterr().out


def test_devices_import_and_list(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate"]) == 0
    fleet = env / "fleet.csv"
    fleet.write_text(
        "external_id,tenant,kind,name,lat,lon,district\n"
        "aq-1,environment,air_station,Guangya school,23.14,113.26,yuexiu\n"
        "gd-1,gas,gas_detector,Tunnel cabin 3,23.10,113.30,haizhu\n"
    )
    capsys.readouterr()
    assert main(["devices", "import", str(fleet)]) == 0
    assert "fleet.csv: 2 created, 0 updated, 0 unchanged" in capsys.readouterr().out
    assert main(["devices", "list", "--tenant", "gas", "--json"]) == 0
    listed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["external_id"] for d in listed] == ["gd-1"]


def test_bad_file_reports_lines_and_imports_nothing(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate"]) == 0
    fleet = env / "fleet.jsonl"
    fleet.write_text(
        '{"external_id": "ok", "tenant": "water", "kind": "rain_gauge", "name": "R"}\n'
        '{"external_id": "bad", "tenant": "water", "kind": "rain_gauge"}\n'
    )
    capsys.readouterr()
    assert main(["devices", "import", str(fleet)]) == 1
    err = capsys.readouterr().err
    assert "line 2: name: Field required" in err and "nothing imported" in err
    assert main(["devices", "list"]) == 0
    assert "0 device(s)" in capsys.readouterr().out


def test_invalid_setting_exits_2_naming_it(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CITYOPS_PARTITIONS_AHEAD_DAYS", "zero")
    assert main(["db", "status"]) == 2
    assert "invalid setting CITYOPS_PARTITIONS_AHEAD_DAYS" in capsys.readouterr().err


def test_no_database_configured_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CITYOPS_DATABASE_URL", raising=False)
    monkeypatch.setenv("CITYOPS_DATA_DIR", str(tmp_path))
    assert main(["db", "status"]) == 2
    assert "CITYOPS_DATABASE_URL is not set" in capsys.readouterr().err


def test_unreachable_database_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CITYOPS_DATABASE_URL", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert main(["db", "migrate"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to postgresql://nobody@127.0.0.1:1/none" in err and "secret" not in err


def test_rules_load_defaults_list_load_validate(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate"]) == 0
    capsys.readouterr()
    assert main(["rules", "load-defaults", "--pack", "drainage"]) == 0
    assert "drainage                 7 created, 0 updated, 0 unchanged" in capsys.readouterr().out
    assert main(["rules", "load-defaults"]) == 0
    out = capsys.readouterr().out
    assert "drainage                 0 created, 0 updated, 7 unchanged" in out
    assert "noise_gb3096             24 created" in out
    mine = env / "mine.yaml"
    mine.write_text(
        "rules:\n"
        "  - {name: pressure-low, severity: medium, source: district standard,\n"
        "     condition: {type: threshold, metric: network_pressure, op: '<', value: 0.2}}\n"
    )
    assert main(["rules", "validate", str(mine)]) == 0
    assert main(["rules", "load", str(mine), "--tenant", "water"]) == 0
    assert "1 rules: 1 created" in capsys.readouterr().out
    assert main(["rules", "list", "--json"]) == 0
    listed = {r["key"]: r for r in map(orjson.loads, capsys.readouterr().out.splitlines())}
    assert listed["water/pressure-low"]["selector"]["tenant"] == "water"
    assert "drainage-ponding-15cm" in listed and len(listed) == 73
    mine.write_text("rules:\n  - {name: broken, severity: loud, source: x, condition: {type: threshold}}\n")
    assert main(["rules", "validate", str(mine)]) == 1
    err = capsys.readouterr().err
    assert "severity" in err and "mine.yaml" in err
    assert main(["rules", "load-defaults", "--pack", "nope"]) == 1
    assert "unknown rule pack(s): nope" in capsys.readouterr().err


def test_rules_backtest_from_the_command_line(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate"]) == 0
    assert main(["rules", "load-defaults", "--pack", "drainage"]) == 0
    capsys.readouterr()
    args = ["rules", "backtest", "--rule", "drainage-ponding-15cm", "--from", "2026-07-01T00:00:00+08:00"]
    assert main([*args, "--to", "2026-07-02T00:00:00+08:00"]) == 0
    assert "0 readings, 0 alerts" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--to", "2026-07-02T00:00:00"])  # no offset: refused by the parser
    assert "needs a UTC offset" in capsys.readouterr().err
