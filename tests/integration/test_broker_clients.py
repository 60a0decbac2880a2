"""The Kafka clients a user reaches for, run against the embedded broker (docs/broker-clients.md).

confluent-kafka and kafka-python work as they are. Debian 12's ``kcat`` 1.7.1 is linked with
librdkafka 2.0.2, whose parser of KIP-482 tagged fields skips one byte too few per field
(fixed in librdkafka 2.2.0, confluentinc/librdkafka#4278). Tansu writes all four tagged
fields of its ApiVersions v3 answer even at their defaults (FinalizedFeaturesEpoch = -1 is
eight 0xff bytes), so that librdkafka reads a 57-bit length and gives up: "ApiVersionRequest
failed: Local: Read underflow". The kcat tests pin down both sides: plain kcat with an old
librdkafka fails with exactly that (so a future broker that fixes it fails the test and the
note gets updated), the flags that skip ApiVersions give listing and consuming but not
producing, and the same kcat binary with a librdkafka >= 2.2.0 does everything.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tgnstream.apps.testing import consume_records

pytestmark = pytest.mark.kafka

N = 20
KCAT = shutil.which("kcat")
needs_kcat = pytest.mark.skipif(
    KCAT is None, reason="kcat is not on PATH (Debian: apt-get install -y kcat; `make test` installs it)"
)

#: librdkafka before this version mis-skips tagged fields (confluentinc/librdkafka#4278).
TAGS_FIXED_IN = (2, 2, 0)
#: With an older librdkafka: never send ApiVersions, use the pre-0.10 protocol table instead.
OLD_LIBRDKAFKA_FLAGS = ["-X", "api.version.request=false", "-X", "broker.version.fallback=0.9.0"]
APIVERSIONS_FAILURE = "ApiVersionRequest failed: Local: Read underflow"


def _records(n: int = N) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(f"k{i}".encode(), f"v{i}".encode(), [("seq", str(i).encode())]) for i in range(n)]


def _produce_with_kafka_python(bootstrap: str, topic: str) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value, headers in _records():
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush(timeout=10)
    finally:
        producer.close()


# -- the Python clients ----------------------------------------------------------------------


def test_confluent_kafka_lists_produces_and_consumes(kafka_bootstrap: str, kafka_topic: str) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    metadata = producer.list_topics(timeout=10)
    assert list(metadata.topics[kafka_topic].partitions) == [0]
    for key, value, headers in _records():
        producer.produce(kafka_topic, key=key, value=value, headers=headers)
    assert producer.flush(10) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"broker-clients-{uuid.uuid4().hex[:8]}",  # never joined: assign, no subscribe
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(kafka_topic, 0, OFFSET_BEGINNING)])
        got = []
        deadline = time.monotonic() + 10
        while len(got) < N and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got.append(msg)
    finally:
        consumer.close()
    assert [m.offset() for m in got] == list(range(N))
    assert [(m.key(), m.value(), m.headers()) for m in got] == _records()


def test_kafka_python_lists_produces_and_consumes(kafka_bootstrap: str, kafka_topic: str) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert kafka_topic in admin.list_topics()
    finally:
        admin.close()
    _produce_with_kafka_python(kafka_bootstrap, kafka_topic)
    got = consume_records(kafka_bootstrap, kafka_topic, N)
    assert [r.offset for r in got] == list(range(N))
    assert [(r.key, r.value, list(r.headers)) for r in got] == _records()


# -- the root cause, in bytes ----------------------------------------------------------------


def _uvarint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def test_apiversions_v3_answer_carries_default_valued_tagged_fields(kafka_bootstrap: str) -> None:
    """The bytes that trip librdkafka < 2.2.0: all four tagged fields, written at their defaults.

    Apache Kafka omits a tagged field that holds its default, so its answer ends in one 0x00.
    """
    host, port = kafka_bootstrap.rsplit(":", 1)
    client_id = b"probe"
    request = struct.pack(">hhih", 18, 3, 7, len(client_id)) + client_id + b"\x00"  # header v2
    request += b"\x06probe" + b"\x061.0.0" + b"\x00"  # ClientSoftwareName/Version, no tags
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))
        reply = s.recv(size, socket.MSG_WAITALL)
    (correlation_id, error_code) = struct.unpack(">ih", reply[:6])
    assert (correlation_id, error_code) == (7, 0)
    count, i = _uvarint(reply, 6)
    for _ in range(count - 1):  # ApiKey, MinVersion, MaxVersion, empty tags
        i += 6
        ntags, i = _uvarint(reply, i)
        assert ntags == 0
    i += 4  # ThrottleTimeMs
    tags = {}
    ntags, i = _uvarint(reply, i)
    for _ in range(ntags):
        tag, i = _uvarint(reply, i)
        length, i = _uvarint(reply, i)
        tags[tag] = reply[i : i + length]
        i += length
    assert i == len(reply)
    # SupportedFeatures = [], FinalizedFeaturesEpoch = -1, FinalizedFeatures = [], ZkMigrationReady = false
    assert tags == {0: b"\x01", 1: b"\xff" * 8, 2: b"\x01", 3: b"\x00"}, (
        "the broker's ApiVersions v3 answer changed: re-check kcat with librdkafka < 2.2.0 and "
        "update docs/broker-clients.md"
    )


# -- kcat --------------------------------------------------------------------------------------


def _kcat(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    assert KCAT is not None
    return subprocess.run(
        [KCAT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def _librdkafka_version(env: dict[str, str] | None = None) -> tuple[int, ...]:
    out = _kcat("-V", env=env).stdout
    m = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", out)
    assert m, out
    return tuple(int(x) for x in m.groups())


def _kcat_topics(bootstrap: str, *flags: str, env: dict[str, str] | None = None) -> dict[str, list[int]]:
    p = _kcat("-b", bootstrap, *flags, "-L", "-J", "-m", "5", env=env)
    assert p.returncode == 0, p.stderr
    meta = json.loads(p.stdout)
    return {t["topic"]: [q["partition"] for q in t["partitions"]] for t in meta["topics"]}


def _kcat_consume(bootstrap: str, topic: str, offset: str, *flags: str, env: dict[str, str] | None = None):
    return _kcat(
        "-b", bootstrap, *flags, "-C", "-t", topic, "-p", "0", "-o", offset, "-e", "-q",
        "-f", "%o|%k|%s|%h\n", env=env,
    )  # fmt: skip


def _expected_kcat_lines(records=None, start: int = 0) -> list[str]:
    records = _records() if records is None else records
    return [
        f"{start + i}|{k.decode()}|{v.decode()}|{','.join(f'{n}={x.decode()}' for n, x in h)}"
        for i, (k, v, h) in enumerate(records)
    ]


@pytest.fixture(scope="module")
def modern_kcat_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment in which kcat runs with a librdkafka >= 2.2.0.

    Its own if it has one; else the librdkafka bundled in the confluent-kafka wheel (the same
    kcat binary, only the shared library swapped through LD_LIBRARY_PATH).
    """
    if KCAT is None:
        pytest.skip("kcat is not on PATH")
    if _librdkafka_version() >= TAGS_FIXED_IN:
        return {}
    import confluent_kafka

    wheel_libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    libs = sorted(glob.glob(str(wheel_libs / "librdkafka*.so*")))
    if not libs:
        pytest.skip(
            "no librdkafka >= 2.2.0 to run kcat with (confluent-kafka wheel without a bundled librdkafka)"
        )
    d = tmp_path_factory.mktemp("librdkafka")
    (d / "librdkafka.so.1").symlink_to(libs[0])
    env = {"LD_LIBRARY_PATH": str(d)}
    assert _librdkafka_version(env) >= TAGS_FIXED_IN
    return env


@needs_kcat
def test_plain_kcat_depends_on_its_librdkafka(kafka_bootstrap: str, kafka_topic: str) -> None:
    """Without flags kcat works with librdkafka >= 2.2.0 and fails with an older one."""
    version = _librdkafka_version()
    p = _kcat("-b", kafka_bootstrap, "-L", "-J", "-m", "2")
    if version >= TAGS_FIXED_IN:
        assert p.returncode == 0, p.stderr
        assert kafka_topic in p.stdout
        return
    assert p.returncode != 0 and APIVERSIONS_FAILURE in p.stderr, (
        f"kcat with librdkafka {'.'.join(map(str, version))} now talks to the embedded broker "
        "without flags: the broker's ApiVersions answer was fixed, update docs/broker-clients.md "
        f"and drop the workaround.\nstdout: {p.stdout}\nstderr: {p.stderr}"
    )


@needs_kcat
def test_old_librdkafka_kcat_lists_and_consumes_with_fallback_flags(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    if _librdkafka_version() >= TAGS_FIXED_IN:
        pytest.skip(
            "kcat's librdkafka is >= 2.2.0: no flags needed (test_plain_kcat_depends_on_its_librdkafka)"
        )
    _produce_with_kafka_python(kafka_bootstrap, kafka_topic)
    assert _kcat_topics(kafka_bootstrap, *OLD_LIBRDKAFKA_FLAGS)[kafka_topic] == [0]

    # An absolute start offset works (Fetch v1; the broker's v2 record batches, headers included)...
    p = _kcat_consume(kafka_bootstrap, kafka_topic, "0", *OLD_LIBRDKAFKA_FLAGS)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == _expected_kcat_lines()
    # ... a logical one does not: the broker's ListOffsets v0 answer lacks its offsets array.
    p = _kcat_consume(kafka_bootstrap, kafka_topic, "beginning", *OLD_LIBRDKAFKA_FLAGS)
    assert p.returncode != 0 and "Failed to query logical offset" in p.stderr, p.stderr
    # Producing does not either: the 0.9 protocol sends MessageSet v1, which the broker cannot read.
    p = _kcat("-b", kafka_bootstrap, *OLD_LIBRDKAFKA_FLAGS, "-P", "-t", kafka_topic, "-K:", stdin="x:y\n")
    assert p.returncode != 0 and "Broker transport failure" in p.stderr, p.stderr
    assert len(consume_records(kafka_bootstrap, kafka_topic, N)) == N  # nothing was appended
    with pytest.raises(TimeoutError):
        consume_records(kafka_bootstrap, kafka_topic, 1, offset=N, timeout=1.0)


@needs_kcat
def test_kcat_with_librdkafka_2_2_or_later_lists_produces_and_consumes(
    kafka_bootstrap: str, kafka_topic: str, modern_kcat_env: dict[str, str]
) -> None:
    env = modern_kcat_env
    assert _kcat_topics(kafka_bootstrap, env=env)[kafka_topic] == [0]
    _produce_with_kafka_python(kafka_bootstrap, kafka_topic)
    extra = [(b"kc0", b"from-kcat-0", []), (b"kc1", b"from-kcat-1", [])]
    p = _kcat(
        "-b", kafka_bootstrap, "-P", "-t", kafka_topic, "-p", "0", "-K:",
        env=env, stdin="".join(f"{k.decode()}:{v.decode()}\n" for k, v, _ in extra),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = _kcat_consume(kafka_bootstrap, kafka_topic, "beginning", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == _expected_kcat_lines() + _expected_kcat_lines(extra, start=N)
    got = consume_records(kafka_bootstrap, kafka_topic, 2, offset=N)  # kafka-python reads kcat's
    assert [(r.key, r.value) for r in got] == [(k, v) for k, v, _ in extra]
