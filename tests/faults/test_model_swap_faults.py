"""Hot swap under a query load against a real server (issue 25, items 1-2): a version with one NaN
weight, an edited manifest, a resealed manifest naming another version, each refused with its
reason, counted, and never served (zero failed queries); then a wiped store that starts again at
v000001 is detected and followed."""

from __future__ import annotations

import copy
import shutil
import threading
import time

import grpc
import pytest
import torch

from tgnstream.apps.testing import publish_tampered
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.runtime.models import ModelStore

from .conftest import TOPIC, produce, server_config, stream, wait_for

pytestmark = pytest.mark.faults


class QueryLoad(threading.Thread):
    """Score and TopK at about 50 requests per second each; every failure kept."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.done = server, threading.Event()
        self.ok, self.failures, self.versions = 0, [], []

    def run(self) -> None:
        with self.server.channel() as ch:
            stub = self.server.stub(ch)
            while not self.done.is_set():
                try:
                    r = stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="u1", dst="p1")]), timeout=5)
                    stub.TopK(pb.TopKRequest(src="u2", k=5), timeout=5)
                    self.ok += 1
                    if not self.versions or self.versions[-1] != r.state.model_version:
                        self.versions.append(r.state.model_version)
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code()}: {e.details()}")
                time.sleep(0.02)


def _copy(engine: MemoryEngine) -> MemoryEngine:
    return copy.deepcopy(engine).eval()


def test_broken_and_tampered_versions_are_refused_under_load_and_a_restarted_store_is_followed(
    broker, servers, tmp_path
):
    produce(broker.bootstrap, stream(2000))
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    model = MemoryEngine(ModelConfig.preset("tgn", width=32, pair_features=True)).eval()
    store.publish(_copy(model), {}, TOPIC)
    config = server_config(
        tmp_path, broker.bootstrap, models={"dir": str(store.root), "watch_interval_s": 0.2}
    )
    server = servers(config).start()
    server.wait_offset(2000)
    wait_for(lambda: server.health("") == 1, 60, "restored")
    load = QueryLoad(server)
    load.start()

    def refused(reason: str) -> float:
        return server.metric("tgnstream_model_swaps_total", result="refused", reason=reason) or 0.0

    # 1. One NaN in one decoder weight, correctly sealed.
    nan = _copy(model)
    with torch.no_grad():
        nan.model.decoder.lin_out.weight[0, 0] = float("nan")
    store.publish(nan, {}, TOPIC, parent="v000001")
    wait_for(lambda: refused("nonfinite_weights") == 1, 30, "the NaN version's refusal")
    # 2. A manifest edited without resealing.
    publish_tampered(store.root, _copy(model), TOPIC, lambda m: m.update(next_offsets={"0": 1000}), False)
    wait_for(lambda: refused("manifest") == 1, 30, "the edited manifest's refusal")
    # 3. A sealed manifest that names another version.
    publish_tampered(store.root, _copy(model), TOPIC, lambda m: m.update(version="v000001"), True)
    wait_for(lambda: refused("manifest") == 2, 30, "the misnamed manifest's refusal")
    # A sound version after them is swapped in.
    good = store.publish(_copy(model), {}, TOPIC, parent="v000001")
    wait_for(lambda: server.info().model_version == good.version, 60, f"{good.version} served")
    # 4. The store wiped and started again: v000001 of a new lineage is followed.
    old_lineage = store.lineage()
    for path in store.root.iterdir():
        shutil.rmtree(path)
    restarted = store.publish(_copy(model), {}, TOPIC)
    assert restarted.version == "v000001" and restarted.lineage != old_lineage
    wait_for(lambda: server.metric("tgnstream_model_lineage_changes_total") == 1, 30, "the lineage change")
    wait_for(lambda: server.info().model_version == "v000001", 60, "the new lineage served")
    time.sleep(0.5)
    load.done.set()
    load.join(10)

    assert not load.failures, load.failures[:5]
    assert load.ok > 50 and load.versions == ["v000001", good.version, "v000001"], load.versions
    assert refused("nonfinite_weights") == 1 and refused("manifest") == 2
    assert server.metric("tgnstream_model_swaps_total", result="swapped", reason="") == 2
    log = server.log()
    errors = [line for line in log.splitlines() if " ERROR " in line and "refused" in line]
    assert len(errors) == 3, errors  # one line per refusal, with the version and the reason
    assert "v000002 refused [nonfinite_weights]: model.decoder.lin_out.weight" in log
    assert "v000003 refused [manifest]" in log and "v000004 refused [manifest]" in log
    assert "the models store was restarted" in log
    print(f"{load.ok} query rounds, 0 failed; served {load.versions}")
    print("\n".join(errors + [line for line in log.splitlines() if "canary" in line or "restarted" in line]))
