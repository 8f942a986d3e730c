"""The one settings object: read once at start-up from ``CITYOPS_*`` variables and passed down.

Nothing else in cityops reads the environment. Invalid values fail at start-up with a message that
names the variable (see :func:`load_settings`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cityops.errors import ConfigError

ENV_PREFIX = "CITYOPS_"


class StorageMode(StrEnum):
    AUTO = "auto"
    TIMESCALE = "timescale"
    NATIVE = "native"


class MqttProtocol(StrEnum):
    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"


class BrokerAdmin(StrEnum):
    NONE = "none"  # the broker has no account API: provisioning issues no credentials
    MOSQUITTO_DYNSEC = "mosquitto-dynsec"  # Mosquitto's dynamic-security plugin over $CONTROL


class LogFormat(StrEnum):
    CONSOLE = "console"
    JSON = "json"


PositiveSeconds = Annotated[float, Field(gt=0)]


class MqttEndpoint:
    """A parsed ``mqtt://`` / ``mqtts://`` URL."""

    __slots__ = ("host", "password", "port", "tls", "username")

    def __init__(self, host: str, port: int, tls: bool, username: str | None, password: str | None):
        self.host = host
        self.port = port
        self.tls = tls
        self.username = username
        self.password = password

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"scheme must be mqtt:// or mqtts://, got {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise ValueError("no host in the URL")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, tls, username, password)

    def url(self, *, with_password: bool = False) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username:
            secret = f":{self.password}" if (self.password and with_password) else ""
            auth = f"{self.username}{secret}@"
        return f"{scheme}://{auth}{self.host}:{self.port}"


class Settings(BaseSettings):
    """Every setting of every cityops process, with the defaults a district pilot needs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=None,
        extra="ignore",
        validate_default=True,
        frozen=True,
    )

    # --- database -------------------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db). Unset: embedded PostgreSQL.",
    )
    storage_mode: StorageMode = Field(
        default=StorageMode.AUTO,
        description="auto: TimescaleDB when the extension can be created, else native partitioning.",
    )
    db_pool_min: int = Field(default=1, ge=0, le=100)
    db_pool_max: int = Field(default=8, ge=1, le=200)
    partitions_ahead_days: int = Field(default=7, ge=1, le=366)
    retention_raw_days: int = Field(default=90, ge=1, description="raw readings kept this long")
    retention_1m_days: int = Field(default=400, ge=1, description="1-minute rollups kept this long")
    retention_1h_days: int = Field(default=1830, ge=1, description="1-hour rollups kept this long")
    compress_after_days: int = Field(default=7, ge=1, description="TimescaleDB compression age")

    # --- broker ---------------------------------------------------------------------------------
    mqtt_url: str | None = Field(
        default=None, description="mqtt://user:pass@host:1883 or mqtts://…; unset: embedded broker"
    )
    mqtt_protocol: MqttProtocol = MqttProtocol.AUTO
    mqtt_client_id: str = Field(default="cityops-pipeline", min_length=1, max_length=128)
    mqtt_session_expiry: int = Field(default=3600, ge=0, description="seconds the broker keeps our session")
    mqtt_keepalive: int = Field(default=30, ge=5, le=3600)
    mqtt_tls_ca_file: Path | None = None
    mqtt_tls_cert_file: Path | None = None
    mqtt_tls_key_file: Path | None = None
    mqtt_tls_insecure: bool = Field(default=False, description="skip hostname verification (tests only)")
    topic_root: str = Field(
        default="cityops",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="first topic level; tests and shared brokers use their own",
    )
    subscription_group: str = Field(
        default="cityops",
        pattern=r"^[A-Za-z0-9_.-]{0,64}$",
        description="shared-subscription group of the pipelines; empty: a plain subscription (one pipeline)",
    )
    receive_maximum: int = Field(
        default=20_000,
        ge=1,
        le=65535,
        description="messages in flight (unacknowledged) per pipeline; the broker holds the rest",
    )

    # --- ingest ---------------------------------------------------------------------------------
    batch_max_rows: int = Field(default=20_000, ge=1, le=1_000_000)
    batch_interval: PositiveSeconds = Field(default=0.2, description="seconds before a partial batch flushes")
    max_clock_skew: PositiveSeconds = Field(default=300.0, description="seconds a ts may be in the future")
    rollup_interval: PositiveSeconds = Field(default=10.0, description="native mode: rollup refresh period")
    presence_interval: PositiveSeconds = Field(default=5.0, description="seconds between last_seen writes")
    shutdown_timeout: PositiveSeconds = Field(default=30.0, description="seconds to drain on SIGTERM")
    pipeline_metrics_port: int = Field(default=9108, ge=0, le=65535, description="Prometheus; 0: off")

    # --- rules ----------------------------------------------------------------------------------
    rules_enabled: bool = Field(default=True, description="evaluate rules in the pipeline")
    rules_install_defaults: bool = Field(
        default=True, description="install the default rule packs when the rules table is empty"
    )
    rules_tick_interval: PositiveSeconds = Field(
        default=1.0, description="seconds between timer checks (no_data, `for`, shelve expiry)"
    )
    rules_replay_max_hours: float = Field(
        default=26.0,
        gt=0,
        le=24 * 31,
        description="on start, rule state is rebuilt from at most this much recent history",
    )

    # --- demo -----------------------------------------------------------------------------------
    demo: bool = Field(default=False, description="cityops up: play the demo scenario (cityops up --demo)")

    # --- device accounts on the broker -------------------------------------------------------
    broker_admin: BrokerAdmin = Field(
        default=BrokerAdmin.NONE, description="how provisioning creates device accounts on the broker"
    )
    broker_admin_url: str | None = Field(
        default=None, description="mqtt://admin:password@host:1883 of an account allowed $CONTROL"
    )
    device_mqtt_url: str | None = Field(
        default=None, description="the broker URL handed to provisioned devices (default: CITYOPS_MQTT_URL)"
    )

    # --- API ------------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_rate_limit: float = Field(
        default=50.0, ge=0, description="requests per second per API key; 0: no limit"
    )
    api_rate_burst: float = Field(default=200.0, ge=1, description="requests a key may make at once")

    # --- local state, embedded services, logs ----------------------------------------------------
    data_dir: Path = Field(default=Path(".cityops"), description="embedded services and runtime files")
    embedded_fallback: bool = Field(
        default=False,
        description="start embedded services when a configured URL is unreachable",
    )
    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error|critical)$")
    log_format: LogFormat = LogFormat.CONSOLE

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("mqtt_url", "broker_admin_url", "device_mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        MqttEndpoint.parse(value)
        return value

    @field_validator("mqtt_tls_ca_file", "mqtt_tls_cert_file", "mqtt_tls_key_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @property
    def mqtt(self) -> MqttEndpoint | None:
        return MqttEndpoint.parse(self.mqtt_url) if self.mqtt_url else None


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; turn a validation error into a message naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "?"
        lines.append(f"invalid setting {ENV_PREFIX}{field.upper()}: {error['msg']}")
    return "\n".join(lines)
