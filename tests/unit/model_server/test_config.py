"""GrpcConfig validation: clear errors for inconsistent settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tgnstream.model_server.config import GrpcConfig


def test_defaults_are_consistent():
    cfg = GrpcConfig()
    assert (cfg.host, cfg.port, cfg.max_pairs, cfg.tls, cfg.auth_token) == (
        "127.0.0.1",
        50051,
        10_000,
        False,
        None,
    )
    assert cfg.address == "127.0.0.1:50051"
    assert GrpcConfig(host="::1", port=0).address == "[::1]:0"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tls_cert_file="c.pem"), "must be given together"),
        (dict(max_workers=8, max_inflight=4, max_queued=3), r"max_inflight \+ max_queued"),
        (dict(max_workers=16, hard_limit_rpcs=16), "hard_limit_rpcs"),
        (dict(auth_token="  "), "auth_token must not be empty"),
        (dict(port=70000), "less than or equal to 65535"),
        (dict(max_k=0), "greater than or equal to 1"),
        (dict(queue_timeout_s=0), "greater than 0"),
        (dict(nonsense=1), "Extra inputs are not permitted"),
    ],
)
def test_invalid(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        GrpcConfig(**kwargs)


def test_frozen():
    with pytest.raises(ValidationError):
        GrpcConfig().port = 1
