"""Integration fixtures: one embedded Kafka broker per test session, a fresh topic per test.

The broker starts only when a test asks for ``kafka_bootstrap`` (directly or through
``kafka_topic``); such tests carry ``@pytest.mark.kafka``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tgnstream.apps.broker import EmbeddedBroker
from tgnstream.stream.kafka_admin import create_topic


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address ("127.0.0.1:PORT") of an embedded broker shared by the session."""
    with EmbeddedBroker(startup_timeout=30.0) as broker:
        yield broker.bootstrap


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> str:
    """A new, uniquely named topic with one partition (tests never see each other's records)."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, name, partitions=1)
    return name
