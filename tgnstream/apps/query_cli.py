"""``tgnstream query``: ask a running server from the shell (readable tables, or ``--json``).

The connection and output options (``--target``, ``--json``, ``--tls-ca``, ...) may come
before or after the query's name: ``tgnstream query --json info`` and ``tgnstream query info
--json`` are the same command. Exit status (the CLI's convention, ``tgnstream --help``): 0 the
answer was printed (``health``: SERVING), 1 the server answered with an error (``health``: not
SERVING), 2 the command line is wrong, 3 the server could not be reached (UNAVAILABLE after
the retries).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tgnstream.rpc.limits import MAX_MESSAGE_BYTES

__all__ = ["add_parser", "HELP", "run"]

HELP = "ask a running server: score, topk, embed, info, health"


def _common_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every query takes. ``suppress``: the copy on each query's own parser sets
    only what is given there; the ``query`` parser holds the defaults."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--target", default=default("127.0.0.1:50051"), help="server host:port")
    p.add_argument("--timeout", type=float, default=default(5.0), help="deadline of each attempt, seconds")
    p.add_argument(
        "--retries", type=int, default=default(5), help="attempts after the first while unavailable"
    )
    p.add_argument(
        "--token", default=default(os.environ.get("TGNSTREAM_TOKEN")), help="bearer token (grpc.auth_token)"
    )
    p.add_argument(
        "--tls-ca",
        default=default(None),
        help="PEM of the CA that signed the server's certificate (enables TLS)",
    )
    p.add_argument("--json", action="store_true", default=default(False), help="print the reply as JSON")
    p.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="TLS; without --tls-ca the server is checked against the system's roots",
    )
    p.add_argument(
        "--tls-cert", default=default(None), help="client certificate, PEM (mutual TLS; with --tls-key)"
    )
    p.add_argument("--tls-key", default=default(None), help="private key of --tls-cert, PEM")
    p.add_argument(
        "--tls-server-name", default=default(None), help="name the server's certificate is checked against"
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=default(MAX_MESSAGE_BYTES),
        help=f"largest reply accepted, bytes (default {MAX_MESSAGE_BYTES}: the server's default limit)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "query",
        help=HELP,
        description="Query a tgnstream server over gRPC (retries with backoff while it is unavailable). "
        "The token may also come from TGNSTREAM_TOKEN. The options below may also follow the "
        "query's name. Exit status: 0 answered, 1 an error reply, 2 a wrong command line, 3 the "
        "server unreachable.",
    )
    _common_options(p, suppress=False)
    q = p.add_subparsers(dest="query", required=True)
    s = q.add_parser("score", help="probability of each SRC DST pair")
    s.add_argument("pairs", nargs="+", metavar="SRC DST", help="node ids, in pairs")
    s.add_argument("--time", type=float, help="query time (default: the server's watermark)")
    t = q.add_parser("topk", help="the k most likely destinations of SRC")
    t.add_argument("src")
    t.add_argument("-k", type=int, default=10)
    t.add_argument("--candidates", help="comma-separated ids (default: every destination)")
    t.add_argument(
        "--exclude-seen", action="store_true", help="drop destinations SRC already interacted with"
    )
    t.add_argument("--time", type=float)
    e = q.add_parser("embed", help="embeddings of nodes")
    e.add_argument("nodes", nargs="+")
    e.add_argument("--time", type=float)
    q.add_parser("info", help="the served model version, events applied, offsets")
    q.add_parser("health", help="gRPC health of the LinkPrediction service")
    for name, query in q.choices.items():
        common = query.add_argument_group(f"options of every query (also before '{name}')")
        _common_options(common, suppress=True)
    p.set_defaults(func=run)


def _stamp(state) -> str:
    return f"model {state.model_version}, {state.events_applied} events, watermark {state.watermark:g}"


def run(args) -> int:
    """Run one query; the exit status of the module docstring. A wrong argument (pairs not in
    pairs, a TLS certificate without its key) raises ValueError, which ``tgnstream`` turns
    into status 2; an unreadable TLS file raises OSError."""
    import grpc

    from tgnstream.apps.cli import EXIT_FAILURE, EXIT_UNREACHABLE

    if args.query == "score" and len(args.pairs) % 2:
        raise ValueError("score takes node ids in pairs: SRC DST [SRC DST ...]")
    try:
        return _run(args)
    except grpc.RpcError as e:
        code = e.code()
        print(f"error: {args.target}: {code.name}: {e.details()}", file=sys.stderr)
        return EXIT_UNREACHABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_FAILURE


def _run(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from tgnstream.client import LinkPredictionClient

    with LinkPredictionClient(
        args.target,
        timeout_s=args.timeout,
        retries=args.retries,
        token=args.token,
        tls=args.tls,
        tls_ca_file=args.tls_ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_server_name=args.tls_server_name,
        max_message_bytes=args.max_message_bytes,
    ) as client:
        if args.query == "score":
            pairs = list(zip(args.pairs[0::2], args.pairs[1::2], strict=True))
            reply = client.score(pairs, args.time)
            rows = [
                (s, d, f"{p:.4f}", _unknown(su, du))
                for (s, d), p, su, du in zip(
                    pairs, reply.probabilities, reply.src_unknown, reply.dst_unknown, strict=True
                )
            ]
            return _show(args, reply, ("src", "dst", "probability", "note"), rows, reply.state)
        if args.query == "topk":
            cands = [c for c in (args.candidates or "").split(",") if c]
            reply = client.top_k(args.src, args.k, cands, args.exclude_seen, args.time)
            rows = [
                (i + 1, r.id, f"{r.probability:.4f}", "cold start" if r.unknown else "")
                for i, r in enumerate(reply.results)
            ]
            return _show(args, reply, ("rank", "dst", "probability", "note"), rows, reply.state)
        if args.query == "embed":
            reply = client.embed(args.nodes, args.time)
            rows = [
                (
                    e.id,
                    ", ".join(f"{v:.3f}" for v in e.values[:6]) + (" ..." if len(e.values) > 6 else ""),
                    "cold start" if e.unknown else "",
                )
                for e in reply.embeddings
            ]
            return _show(args, reply, ("node", f"embedding (dim {reply.dim})", "note"), rows, reply.state)
        if args.query == "info":
            reply = client.model_info()
            if args.json:
                print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=1))
                return 0
            for key, value in MessageToDict(
                reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            ).items():
                print(f"{key:<16} {value}")
            return 0
        status = client.health()
        print(json.dumps({"status": status}) if args.json else status)
        return 0 if status == "SERVING" else 1


def _unknown(src: bool, dst: bool) -> str:
    return ", ".join(x for x, flag in (("src unknown", src), ("dst unknown", dst)) if flag)


def _show(args, reply, header, rows, state) -> int:
    from google.protobuf.json_format import MessageToDict

    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=1))
        return 0
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"({_stamp(state)})")
    return 0
