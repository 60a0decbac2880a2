"""The checked-in gRPC stubs match protos/ and the pinned generator, and serve the contract.

The staleness check (``scripts/gen_protos.py --check``) is exercised both ways: it passes on the
tree as committed and reports a difference when a proto changes, a stub is missing, or a stray
stub is left behind. The expectations (which file names, which method names) are written out
here, not derived from the script.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
STUB_DIR = Path("tgnstream/rpc/v1")


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/gen_protos.py loaded as a module (scripts/ is not a package)."""
    path = REPO_ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_current(gen: ModuleType) -> None:
    problems = gen.check(REPO_ROOT / "protos", REPO_ROOT)
    assert problems == [], "stubs out of date; run: python scripts/gen_protos.py\n" + "\n".join(problems)


def test_check_reports_a_changed_proto(gen: ModuleType, tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(REPO_ROOT / "protos", protos)
    proto = protos / "tgnstream/rpc/v1/link_prediction.proto"
    text = proto.read_text()
    pair = "message Pair {\n  string src = 1;\n  string dst = 2;\n"
    assert pair in text
    proto.write_text(text.replace(pair, pair + "  string note = 3;\n"))

    problems = gen.check(protos, REPO_ROOT)

    # The new field changes the descriptor (.py) and the typed signature (.pyi) of
    # link_prediction only; the grpc module and event.proto's stubs are unaffected.
    assert sorted(problems) == [
        f"differs: {STUB_DIR / 'link_prediction_pb2.py'}",
        f"differs: {STUB_DIR / 'link_prediction_pb2.pyi'}",
    ]


def test_check_reports_missing_and_extra_stubs(gen: ModuleType, tmp_path: Path) -> None:
    out_root = tmp_path / "tree"
    shutil.copytree(REPO_ROOT / STUB_DIR, out_root / STUB_DIR)
    assert gen.check(REPO_ROOT / "protos", out_root) == []  # an exact copy is current

    (out_root / STUB_DIR / "event_pb2_grpc.py").unlink()
    (out_root / STUB_DIR / "old_api_pb2.py").write_text("# left over from a deleted proto\n")
    problems = gen.check(REPO_ROOT / "protos", out_root)
    assert sorted(problems) == [
        f"extra: {STUB_DIR / 'old_api_pb2.py'}",
        f"missing: {STUB_DIR / 'event_pb2_grpc.py'}",
    ]
    assert gen.main(["--check", "--out-root", str(out_root)]) == 1


def test_write_restores_stubs_and_removes_stale_ones(gen: ModuleType, tmp_path: Path) -> None:
    out_root = tmp_path / "tree"
    (out_root / STUB_DIR).mkdir(parents=True)
    (out_root / STUB_DIR / "__init__.py").write_text("")
    (out_root / STUB_DIR / "old_api_pb2.py").write_text("")
    assert gen.main(["--out-root", str(out_root)]) == 0
    names = sorted(p.name for p in (out_root / STUB_DIR).iterdir())
    assert names == [
        "__init__.py",  # not a generated file: left alone
        "event_pb2.py",
        "event_pb2.pyi",
        "event_pb2_grpc.py",
        "link_prediction_pb2.py",
        "link_prediction_pb2.pyi",
        "link_prediction_pb2_grpc.py",
    ]
    for name in names[1:]:
        assert (out_root / STUB_DIR / name).read_bytes() == (REPO_ROOT / STUB_DIR / name).read_bytes()


def test_refuses_an_unpinned_grpcio_tools(
    gen: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gen, "installed_grpcio_tools", lambda: "1.85.1")
    expected = r"grpcio-tools==\S+ is required.*1\.85\.1 is installed"
    with pytest.raises(gen.GeneratorVersionError, match=expected):
        gen.check(REPO_ROOT / "protos", REPO_ROOT)
    assert gen.main(["--check"]) == 2
    assert "1.85.1 is installed" in capsys.readouterr().err


def test_pins_agree(gen: ModuleType) -> None:
    """grpcio floor == grpcio-tools pin == generator of the stubs; protobuf floor == their gencode."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    pin = gen.PINNED_GRPCIO_TOOLS
    floors = {d.split(">=")[0]: d.split(">=")[1].split(",")[0] for d in deps if ">=" in d}
    assert floors["grpcio"] == pin
    assert f"grpcio-tools=={pin}" in project["optional-dependencies"]["test"]

    from tgnstream.rpc.v1 import link_prediction_pb2, link_prediction_pb2_grpc

    assert link_prediction_pb2_grpc.GRPC_GENERATED_VERSION == pin
    header = Path(link_prediction_pb2.__file__).read_text()
    gencode = re.search(r"# Protobuf Python Version: (\S+)", header)
    assert gencode is not None
    assert floors["protobuf"] == gencode.group(1)


def test_link_prediction_service_contract() -> None:
    from tgnstream.rpc.v1 import link_prediction_pb2 as pb
    from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["LinkPrediction"]
    assert service.full_name == "tgnstream.rpc.v1.LinkPrediction"
    signatures = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert signatures == {
        "Score": ("ScoreRequest", "ScoreResponse", False, False),
        "TopK": ("TopKRequest", "TopKResponse", False, False),
        "Embed": ("EmbedRequest", "EmbedResponse", False, False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False, False),
    }
    for name in signatures:
        assert callable(getattr(pb_grpc.LinkPredictionServicer, name))


def test_stubs_round_trip_through_a_real_server() -> None:
    """Generated servicer + stub talk over a loopback channel with the installed grpcio."""
    from tgnstream.rpc.v1 import link_prediction_pb2 as pb
    from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

    class Echo(pb_grpc.LinkPredictionServicer):
        def Score(self, request, context):  # noqa: N802 (gRPC method name)
            return pb.ScoreResponse(
                probabilities=[0.25] * len(request.pairs),
                src_unknown=[p.src == "new" for p in request.pairs],
                state=pb.StateStamp(model_version="v7", events_applied=3, watermark=request.time),
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    pb_grpc.add_LinkPredictionServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LinkPredictionStub(channel)
            reply = stub.Score(
                pb.ScoreRequest(pairs=[pb.Pair(src="a", dst="b"), pb.Pair(src="new", dst="b")], time=5.5),
                timeout=10,
            )
            assert list(reply.probabilities) == [0.25, 0.25]
            assert list(reply.src_unknown) == [False, True]
            assert (reply.state.model_version, reply.state.events_applied, reply.state.watermark) == (
                "v7",
                3,
                5.5,
            )
            with pytest.raises(grpc.RpcError) as err:  # not implemented by Echo
                stub.TopK(pb.TopKRequest(src="a", k=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)
