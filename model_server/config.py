"""Typed, frozen configuration of the gRPC front end (no environment parsing here: the
composition root reads settings and builds a ``GrpcConfig``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from tgnstream.rpc.limits import MAX_MESSAGE_BYTES

__all__ = ["GrpcConfig", "RESERVED_WORKERS"]

# Worker threads kept free of admitted LinkPrediction calls, so that health checks, reflection
# and the fast RESOURCE_EXHAUSTED rejections always find a thread (see ``admission.py``).
RESERVED_WORKERS = 2


class GrpcConfig(BaseModel):
    """How the ``tgnstream.rpc.v1.LinkPrediction`` server listens, admits and validates requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="interface to bind; 0.0.0.0 / :: for all")
    port: int = Field(50051, ge=0, le=65535, description="TCP port; 0 picks a free one (tests)")
    readers: int | None = Field(
        None,
        ge=0,
        description="reader processes answering gRPC on the same port (SO_REUSEPORT) from the state "
        "in shared memory, while the serving process only ingests; None: one per CPU the process may "
        "use (affinity and cgroup quota, so a container's CPU limit), at most max_default_readers; 0: "
        "the serving process answers itself (one process, one interpreter lock for ingest and queries). "
        "Each reader is a Python process with torch: budget ~350 MB of memory per reader",
    )
    max_default_readers: int = Field(
        8, ge=1, description="cap of the default reader count (readers unset); an explicit readers wins"
    )
    reader_torch_threads: int = Field(1, ge=1, description="torch intra-op threads of each reader process")
    max_workers: int = Field(
        32,
        ge=RESERVED_WORKERS + 1,
        description="threads of the server's pool; every running RPC (admitted, queued for "
        "admission, being rejected, health, reflection) holds one",
    )
    max_inflight: int = Field(
        16,
        ge=1,
        description="LinkPrediction RPCs admitted at once. Admitted requests wait (without the GIL) "
        "for a coalesced batch or a compute slot, so a high value makes batches larger; "
        "compute_threads bounds the actual engine work",
    )
    compute_threads: int = Field(
        2,
        ge=1,
        description="engine computations running at once (a coalesced batch counts as one); "
        "the rest of the admitted requests wait without holding the GIL. More than the number of "
        "cores only makes threads fight over the GIL (throughput collapses)",
    )
    max_queued: int = Field(
        8,
        ge=0,
        description="LinkPrediction RPCs allowed to wait for an in-flight slot; beyond in-flight + "
        "queued a request is answered RESOURCE_EXHAUSTED at once",
    )
    queue_timeout_s: float = Field(
        0.05,
        gt=0.0,
        le=10.0,
        description="longest wait of a queued RPC for a slot (capped by the client's deadline) "
        "before RESOURCE_EXHAUSTED",
    )
    hard_limit_rpcs: int = Field(
        64,
        ge=1,
        description="grpc's own maximum_concurrent_rpcs: RPCs accepted (running or waiting for a "
        "thread) beyond it are refused by grpc itself at once, before any interceptor (so not "
        "counted in grpc_server_handled_total), health checks included. It bounds the time a "
        "request can wait for a worker thread; must exceed max_workers",
    )
    max_pairs: int = Field(
        10_000, ge=1, description="most (src, dst) pairs in one Score request (and in one coalesced batch)"
    )
    max_k: int = Field(1_000, ge=1, description="largest k a TopK request may ask for")
    max_candidates: int = Field(100_000, ge=1, description="most explicit candidates in one TopK request")
    max_embed_nodes: int = Field(10_000, ge=1, description="most nodes in one Embed request")
    max_message_bytes: int = Field(
        MAX_MESSAGE_BYTES,
        ge=1024,
        description="largest request and reply, bytes (an Embed reply is about nodes x dim x 5 "
        "bytes); grpc refuses larger requests with RESOURCE_EXHAUSTED",
    )
    coalesce: bool = Field(
        True,
        description="answer concurrent Score requests (and TopK requests over the default "
        "candidates) with one batched engine call; the engine's cost is mostly per call, so this "
        "multiplies throughput under load and adds no delay when idle",
    )
    warm_candidates: bool = Field(
        True,
        description="while TopK is in use, rebuild its candidate-embedding cache in a background "
        "thread as soon as a batch is applied, instead of in the first TopK after it",
    )
    max_topk_batch: int = Field(64, ge=1, description="most TopK requests coalesced into one ranking pass")
    strict_candidates: bool = Field(
        False,
        description="unknown TopK candidate ids are always INVALID_ARGUMENT (a request can also ask "
        "with strict=true); otherwise they are ranked as cold-start nodes and flagged",
    )
    topk_cache_max_age_ms: float = Field(
        0.0,
        ge=0.0,
        description="how long TopK may keep using candidate embeddings computed for an older state "
        "version (bounded staleness, for high ingest rates); 0: recomputed for every version (exact)",
    )
    topk_candidate_time: Literal["query", "last_change"] = Field(
        "query",
        description="when TopK embeds its candidates: 'query' (at the state's watermark, exact, every "
        "candidate recomputed per applied batch) or 'last_change' (each as of the last change in its "
        "neighbourhood, so only candidates a batch reached are recomputed; evaluate the model with the "
        "same setting, docs/serving.md, 'TopK candidate times')",
    )
    topk_catalog_threshold: int = Field(
        50_000,
        ge=1,
        description="TopK over the default candidates ranks every candidate exactly below this many "
        "candidates; from it on, it ranks exactly only a shortlist: an ANN search (FAISS IVF, the "
        "decoder linearised) plus the source's past partners and the newest and busiest candidates "
        "(docs/topk-catalog.md)",
    )
    topk_shortlist: int = Field(
        500, ge=1, description="two-stage TopK: candidates the ANN search adds to a source's shortlist"
    )
    topk_ivf_nprobe: int = Field(32, ge=1, description="two-stage TopK: IVF lists scanned per source")
    topk_ivf_nlist: int = Field(
        0, ge=0, description="two-stage TopK: IVF lists; 0: about sqrt(candidates), a power of two"
    )
    topk_recent: int = Field(
        200, ge=0, description="two-stage TopK: candidates with the newest events added to every shortlist"
    )
    topk_popular: int = Field(
        100, ge=0, description="two-stage TopK: candidates with the most events added to every shortlist"
    )
    query_time_slack_s: float = Field(
        86_400.0,
        ge=0.0,
        description="a query's explicit time must lie within [first applied event - this, watermark "
        "+ this] (INVALID_ARGUMENT otherwise): the model was never meant to answer for times far "
        "outside the stream it has seen",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain; with tls_key_file enables TLS"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None,
        description="mutual TLS: PEM of the CA(s) that sign client certificates; clients without "
        "one are refused at the handshake (needs tls_cert_file)",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="when set, every RPC except grpc.health.v1 must carry metadata "
        "'authorization: Bearer <token>' (UNAUTHENTICATED otherwise)",
    )
    reflection: bool = Field(
        True, description="serve grpc.reflection (grpcurl, grpc_cli); needs the token too"
    )
    shutdown_grace_s: float = Field(
        5.0,
        ge=0.0,
        description="on stop: seconds in-flight RPCs get to finish after health turns NOT_SERVING",
    )

    @model_validator(mode="after")
    def _check(self) -> GrpcConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.max_inflight + self.max_queued > self.max_workers - RESERVED_WORKERS:
            raise ValueError(
                f"max_inflight + max_queued ({self.max_inflight} + {self.max_queued}) must be <= "
                f"max_workers - {RESERVED_WORKERS} ({self.max_workers - RESERVED_WORKERS}): queued "
                "requests hold threads, and health checks and rejections need free ones"
            )
        if self.hard_limit_rpcs <= self.max_workers:
            raise ValueError(
                f"hard_limit_rpcs ({self.hard_limit_rpcs}) must exceed max_workers ({self.max_workers})"
            )
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("auth_token must not be empty (leave it unset to disable auth)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def address(self) -> str:
        """``host:port`` as grpc wants it (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
