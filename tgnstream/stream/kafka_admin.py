"""Kafka topic administration shared by the CLI, the demo and the tests (any Kafka, or Tansu)."""

from __future__ import annotations

import re
import time
from typing import Any

__all__ = ["create_topic", "topic_partitions"]

# Kafka's own rule for topic names (kafka.common.internals.Topic): legal characters, 1..249 long.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def _admin(bootstrap: str, timeout: float, **config: Any):  # -> kafka.KafkaAdminClient
    from kafka import KafkaAdminClient

    ms = max(100, int(timeout * 1000))
    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="tgnstream-admin",
        bootstrap_timeout_ms=ms,
        request_timeout_ms=ms,
        **config,
    )


def topic_partitions(admin, name: str) -> int | None:
    """Partitions of ``name`` with a leader, per a fresh metadata request; None if it is unknown."""
    from kafka.errors import UnknownTopicOrPartitionError

    try:
        described = admin.describe_topics([name])
    except UnknownTopicOrPartitionError:
        return None
    for topic in described:
        if topic["name"] == name and topic["error_code"] == 0:
            parts = topic["partitions"]
            if parts and all(p["error_code"] == 0 and p["leader_id"] >= 0 for p in parts):
                return len(parts)
    return None


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    *,
    exist_ok: bool = True,
    replication_factor: int = 1,
    timeout: float = 10.0,
    **admin_config: Any,
) -> int:
    """Create topic ``name`` and wait until its metadata shows every partition with a leader.

    Returns the topic's partition count (for an existing topic with ``exist_ok``, the count it
    already has, which may differ from ``partitions``). Raises ``ValueError`` for an illegal
    name or partition count, ``kafka.errors.TopicAlreadyExistsError`` if it exists and not
    ``exist_ok``, ``TimeoutError`` if the metadata does not show it within ``timeout`` seconds.
    ``admin_config`` goes to ``KafkaAdminClient`` (e.g. SASL/TLS settings for a real cluster).
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"illegal Kafka topic name {name!r}: use 1-249 of [a-zA-Z0-9._-]")
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    admin = _admin(bootstrap, timeout, **admin_config)
    try:
        try:
            admin.create_topics([NewTopic(name, partitions, replication_factor)])
        except TopicAlreadyExistsError:
            if not exist_ok:
                raise
        # Creation is asynchronous on a real cluster: leaders are elected after the reply.
        deadline = time.monotonic() + timeout
        while True:
            found = topic_partitions(admin, name)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} not visible in {bootstrap} metadata after {timeout:g} s")
            time.sleep(0.05)
    finally:
        admin.close()


def unreachable(bootstrap_servers: str, timeout: float = 2.0) -> str | None:
    """None when a TCP connection to one of the bootstrap servers succeeds within ``timeout``
    seconds, else why not (a quick check before clients that would retry for much longer)."""
    import socket

    errors = []
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout):
                return None
        except (OSError, ValueError) as e:
            errors.append(f"{server.strip()}: {getattr(e, 'strerror', None) or e}")
    return "; ".join(errors)
