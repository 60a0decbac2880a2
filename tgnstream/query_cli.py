"""``tgnstream query``: ask a running server from the shell (readable tables, or ``--json``)."""

from __future__ import annotations

import json
import os
import sys

from google.protobuf.json_format import MessageToDict

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "query",
        help="ask a running server: score, topk, embed, info, health",
        description="Query a tgnstream server over gRPC (retries with backoff while it is unavailable). "
        "The token may also come from TGNSTREAM_TOKEN.",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each attempt, seconds")
    p.add_argument("--retries", type=int, default=5, help="attempts after the first while unavailable")
    p.add_argument(
        "--token", default=os.environ.get("TGNSTREAM_TOKEN"), help="bearer token (grpc.auth_token)"
    )
    p.add_argument("--tls-ca", help="PEM of the CA that signed the server's certificate (enables TLS)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
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
    p.set_defaults(func=run)


def _stamp(state) -> str:
    return f"model {state.model_version}, {state.events_applied} events, watermark {state.watermark:g}"


def run(args) -> int:
    import grpc

    try:
        return _run(args)
    except grpc.RpcError as e:
        print(f"error: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from tgnstream.client import LinkPredictionClient

    with LinkPredictionClient(
        args.target, timeout_s=args.timeout, retries=args.retries, token=args.token, tls_ca_file=args.tls_ca
    ) as client:
        if args.query == "score":
            if len(args.pairs) % 2:
                raise ValueError("score takes node ids in pairs: SRC DST [SRC DST ...]")
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
