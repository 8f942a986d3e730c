from __future__ import annotations

import pytest

from cityops.errors import ConfigError
from cityops.settings import MqttEndpoint, Settings, StorageMode, load_settings


def test_defaults_are_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CITYOPS_DATABASE_URL", "CITYOPS_MQTT_URL", "CITYOPS_BATCH_MAX_ROWS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.database_url is None and settings.mqtt_url is None
    assert settings.batch_max_rows == 20_000
    assert settings.storage_mode is StorageMode.AUTO


def test_environment_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYOPS_BATCH_MAX_ROWS", "5000")
    monkeypatch.setenv("CITYOPS_MQTT_URL", "mqtts://dev%40x:s3cret@broker.example:8883")
    settings = load_settings()
    assert settings.batch_max_rows == 5000
    endpoint = settings.mqtt
    assert endpoint is not None
    assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.username, endpoint.password) == (
        "broker.example",
        8883,
        True,
        "dev@x",
        "s3cret",
    )
    assert "s3cret" not in endpoint.url()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CITYOPS_BATCH_MAX_ROWS", "0"),
        ("CITYOPS_BATCH_INTERVAL", "-1"),
        ("CITYOPS_RECEIVE_MAXIMUM", "70000"),
        ("CITYOPS_DATABASE_URL", "mysql://x"),
        ("CITYOPS_MQTT_URL", "http://broker"),
        ("CITYOPS_STORAGE_MODE", "cassandra"),
        ("CITYOPS_TOPIC_ROOT", "a/b"),
        ("CITYOPS_MQTT_TLS_CA_FILE", "/no/such/ca.pem"),
        ("CITYOPS_LOG_LEVEL", "chatty"),
    ],
)
def test_invalid_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"invalid setting {variable}:"):
        load_settings()


def test_mqtt_default_ports() -> None:
    assert MqttEndpoint.parse("mqtt://h").port == 1883
    assert MqttEndpoint.parse("mqtts://h").port == 8883


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.batch_max_rows = 3  # type: ignore[misc]
