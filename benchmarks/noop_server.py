"""A LinkPrediction server that does no work: the floor of the serving benchmark.

It answers Score with one probability per pair and TopK with k results, computing nothing, on
the same grpcio server type and thread pool as ``tgnstream serve``. Latency measured against it
with the same client, rates and background load is what Python gRPC alone costs on the machine,
so the serving benchmark can report its numbers next to that floor.

    python benchmarks/noop_server.py --port-file /tmp/port
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc


class NoopLinkPrediction(pb_grpc.LinkPredictionServicer):
    """Replies of the right shape, no computation."""

    def Score(self, request, context):
        n = len(request.pairs)
        return pb.ScoreResponse(probabilities=[0.5] * n, src_unknown=[False] * n, dst_unknown=[False] * n)

    def TopK(self, request, context):
        return pb.TopKResponse(results=[pb.ScoredNode(id=str(i), probability=0.5) for i in range(request.k)])

    def GetModelInfo(self, request, context):
        return pb.ModelInfo()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port-file", type=Path, required=True, help="where to write the bound port")
    args = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GrpcConfig().max_workers))
    pb_grpc.add_LinkPredictionServicer_to_server(NoopLinkPrediction(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    args.port_file.write_text(str(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
