"""Server interceptors: Prometheus metrics for every RPC, bearer-token auth, and undecodable
requests.

Order (outermost first, as passed to ``grpc.server``): metrics, auth, undecodable, admission.
Metrics is outermost so that UNAUTHENTICATED, INVALID_ARGUMENT (undecodable) and
RESOURCE_EXHAUSTED replies are counted like any other; auth comes before the undecodable check
so that a client without a token learns nothing but UNAUTHENTICATED.

Undecodable requests: grpc deserializes a request before any behaviour runs, and when the
deserializer raises it answers INTERNAL and logs a traceback per request. ``UndecodableInterceptor``
gives every method a deserializer that cannot raise (a failure becomes a per-method sentinel) and
a behaviour that answers the sentinel INVALID_ARGUMENT, logging nothing. The other interceptors
keep the inner handler's deserializer (``rewrap``), so the one grpc calls is this one.

What metrics cannot see: RPCs refused by grpc itself (unknown method -> UNIMPLEMENTED, and
``GrpcConfig.hard_limit_rpcs`` -> RESOURCE_EXHAUSTED) never reach a handler. Admission
(``admission.py``) is what refuses overload in normal operation, and it is counted. Health
``Watch`` is a callback-driven ("non-blocking") stream that holds no worker thread; wrapping it
would turn it into a thread-holding one, so it passes through unmetered (``Check`` is metered).

Auth exemption: ``grpc.health.v1.Health`` needs no token. Kubernetes gRPC probes (and most
load balancers) cannot send metadata, and a health status reveals nothing about the graph.
Reflection is *not* exempt (it describes the API; grpcurl can send ``-H 'authorization: ...'``).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from tgnstream.runtime.metrics import ServerMetrics

__all__ = [
    "CachingInterceptor",
    "MetricsInterceptor",
    "AuthInterceptor",
    "UndecodableInterceptor",
    "rewrap",
    "split_method",
    "HEALTH_SERVICE",
]

HEALTH_SERVICE = "grpc.health.v1.Health"

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def split_method(full: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> ``("pkg.Service", "Method")``."""
    _, service, method = (full.split("/") + ["", ""])[:3]
    return service, method


def grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


_SAME: Any = object()


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Behaviour], Behaviour],
    streaming: Callable[[Behaviour], Behaviour] | None = None,
    *,
    request_deserializer: Callable[[bytes], Any] | None = _SAME,
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: ``unary`` for methods with a single reply,
    ``streaming`` (a wrapper returning an iterator) for streamed replies (default: ``unary``).
    ``request_deserializer``: a replacement (default: the handler's own)."""
    if request_deserializer is _SAME:
        request_deserializer = handler.request_deserializer
    streaming = streaming or unary
    if handler.request_streaming and handler.response_streaming:
        make, inner, wrap = grpc.stream_stream_rpc_method_handler, handler.stream_stream, streaming
    elif handler.request_streaming:
        make, inner, wrap = grpc.stream_unary_rpc_method_handler, handler.stream_unary, unary
    elif handler.response_streaming:
        make, inner, wrap = grpc.unary_stream_rpc_method_handler, handler.unary_stream, streaming
    else:
        make, inner, wrap = grpc.unary_unary_rpc_method_handler, handler.unary_unary, unary
    return make(
        wrap(inner),
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _non_blocking(handler: grpc.RpcMethodHandler) -> bool:
    behaviour = handler.unary_stream or handler.stream_stream
    return bool(getattr(behaviour, "experimental_non_blocking", False))


def _final_code(context: grpc.ServicerContext, raised: bool) -> grpc.StatusCode:
    # context.code() is set by abort()/set_code(). Without it: an exception after the client
    # went away (e.g. reading a cancelled request stream) is CANCELLED; any other exception is
    # reported by grpc as UNKNOWN; a normal return is OK.
    code = context.code()
    if code is not None:
        return code
    if not raised:
        return grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN if context.is_active() else grpc.StatusCode.CANCELLED


class CachingInterceptor(grpc.ServerInterceptor):
    """Base: wraps each method's handler once (``wrap``) and reuses the result. Rebuilding
    handlers on every call cost ~0.05 ms per interceptor; all per-call work happens inside the
    wrapped behaviours. The inner handler of a method is the same object on every call (grpc
    keeps one per registered method); if it changes, the wrapper is rebuilt."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        raise NotImplementedError

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED (nothing cached)
            return None
        method = handler_call_details.method
        hit = self._cache.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self.wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped


class MetricsInterceptor(CachingInterceptor):
    """``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}``,
    ``grpc_server_handling_seconds`` (handler start to reply; time waiting for a worker
    thread is not included) and ``tgnstream_grpc_inflight_requests``, for every method."""

    def __init__(self, metrics: ServerMetrics):
        super().__init__()
        self._m = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if _non_blocking(handler):
            return handler
        service, name = split_method(method)
        labels = (grpc_type(handler), service, name)
        m = self._m
        # Label children resolved once per method (labels() costs a lock and a dict lookup).
        started_c, seconds_c, inflight = (
            m.grpc_started.labels(*labels),
            m.grpc_seconds.labels(*labels),
            m.grpc_inflight,
        )
        handled_c: dict[grpc.StatusCode, Any] = {}

        def start() -> float:
            started_c.inc()
            inflight.inc()
            return time.perf_counter()

        def finish(t0: float, code: grpc.StatusCode) -> None:
            inflight.dec()
            seconds_c.observe(time.perf_counter() - t0)
            child = handled_c.get(code)
            if child is None:
                child = handled_c[code] = m.grpc_handled.labels(*labels, code.name)
            child.inc()

        def unary(inner: Behaviour) -> Behaviour:
            def call(request, context):
                t0, raised = start(), True
                try:
                    reply = inner(request, context)
                    raised = False
                    return reply
                finally:
                    finish(t0, _final_code(context, raised))

            return call

        def streaming(inner: Behaviour) -> Behaviour:
            def call(request, context) -> Iterator:
                t0, code = start(), None
                try:
                    yield from inner(request, context)
                except GeneratorExit:  # the client went away mid-stream
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = _final_code(context, True)
                    raise
                finally:
                    finish(t0, code or _final_code(context, False))

            return call

        return rewrap(handler, unary, streaming)


class AuthInterceptor(CachingInterceptor):
    """Requires metadata ``authorization: Bearer <token>`` on every method outside ``exempt``
    services (default: health). Constant-time comparison."""

    def __init__(self, token: str, exempt: tuple[str, ...] = (HEALTH_SERVICE,)):
        super().__init__()
        if not token:
            raise ValueError("empty auth token")
        self._expected = f"Bearer {token}".encode()
        self._exempt = frozenset(exempt)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if split_method(method)[0] in self._exempt:
            return handler
        authorized = self._authorized

        def guard(inner: Behaviour) -> Behaviour:
            def call(request, context):
                if not authorized(context.invocation_metadata()):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
                return inner(request, context)

            return call

        def guard_stream(inner: Behaviour) -> Behaviour:
            def call(request, context):
                if not authorized(context.invocation_metadata()):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
                yield from inner(request, context)

            return call

        return rewrap(handler, guard, guard_stream)


class _Undecodable:
    """What the deserializer returns instead of raising; one per method (no per-call object)."""

    __slots__ = ("details",)

    def __init__(self, details: str):
        self.details = details


def _message_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    # Generated code passes ``Message.FromString``: a classmethod bound to the message class.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) and name else f"request message of {method}"


# Attributes grpc reads on a behaviour: keep them, or e.g. health Watch (callback-driven, no
# worker thread) would silently become a thread-holding stream.
_BEHAVIOUR_ATTRS = ("experimental_non_blocking", "experimental_thread_pool")


class UndecodableInterceptor(CachingInterceptor):
    """Bytes that do not decode as the method's request message -> INVALID_ARGUMENT
    ``request body is not a valid <pkg.Message> message``, and nothing is logged.

    Applies to every method with a deserializer: single requests are checked before the inner
    behaviour runs; for request-streaming methods (reflection) the request iterator is checked
    as the servicer reads it, so the messages before a bad one are answered first. Handlers
    without a deserializer (raw bytes) are left untouched.
    """

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer
        if deserialize is None:
            return handler
        sentinel = _Undecodable(f"request body is not a valid {_message_name(deserialize, method)} message")
        details = sentinel.details
        invalid = grpc.StatusCode.INVALID_ARGUMENT

        def safe_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:  # DecodeError, or anything else the parser raises: the client's bytes
                return sentinel

        def checked(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
            for request in requests:
                if request is sentinel:
                    context.abort(invalid, details)
                yield request

        def check(inner: Behaviour) -> Behaviour:
            if handler.request_streaming:

                def call(requests, context, *rest):
                    return inner(checked(requests, context), context, *rest)

            else:

                def call(request, context, *rest):
                    if request is sentinel:
                        context.abort(invalid, details)
                    return inner(request, context, *rest)

            for attr in _BEHAVIOUR_ATTRS:
                if hasattr(inner, attr):
                    setattr(call, attr, getattr(inner, attr))
            return call

        return rewrap(handler, check, check, request_deserializer=safe_deserialize)
