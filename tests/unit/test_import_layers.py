"""The layers, as the folders show them, kept by a test instead of by discipline.

    apps      composition roots and the CLI (tgnstream/apps/, tgnstream/__main__.py)
    services  ingest, model_server, trainer: never import each other
    runtime   what several services need (tgnstream/runtime/)
    stream    Kafka <-> batches (tgnstream/stream/)
    core      the engine: imports nothing of the project but itself
    rpc       generated gRPC/protobuf code and its limits
    client    tgnstream.client, tgnstream.aio_client: the rpc layer only

Each layer imports only the layers below it (lazy imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Where each package's source lives (the services install as tgnstream.<folder>).
SOURCES = {
    "tgnstream": ROOT / "tgnstream",
    "tgnstream.ingest": ROOT / "ingest",
    "tgnstream.model_server": ROOT / "model_server",
    "tgnstream.trainer": ROOT / "trainer",
}
SERVICES = ("ingest", "model_server", "trainer")
ROOT_MODULES = {"tgnstream", "tgnstream.__main__", "tgnstream.client", "tgnstream.aio_client"}
BELOW = {
    "core": {"core"},
    "rpc": {"rpc"},
    "client": {"client", "rpc"},
    "stream": {"stream", "core", "rpc"},
    "runtime": {"runtime", "stream", "core", "rpc"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    if module in ("tgnstream.client", "tgnstream.aio_client"):
        return "client"
    if module in ("tgnstream", "tgnstream.__main__"):
        return "apps"
    return parts[1] if parts[1] in (*SERVICES, "core", "rpc", "stream", "runtime", "apps") else "unknown"


def allowed(importer: str, imported: str) -> bool:
    a, b = layer(importer), layer(imported)
    if a == "apps":
        return True
    if a in SERVICES:
        return b == a or b in BELOW["runtime"]
    return b in BELOW.get(a, set())


def project_modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "tgnstream" and parts and parts[0] in SERVICES:
                continue  # not a source folder of the package
            found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tgnstream"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "tgnstream":
                # ``from tgnstream.x import y`` may name a module y: judge the deepest one.
                out |= {
                    f"{node.module}.{a.name}" if node.module.count(".") < 1 else node.module
                    for a in node.names
                }
    return out


def violations(modules: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer, targets in sorted(modules.items()):
        if layer(importer) == "unknown":
            bad.append(f"{importer}: in no layer (put it in core, stream, runtime, a service or apps)")
        for target in sorted(targets):
            if target.startswith("tgnstream.rpc.v1") and layer(importer) != "core":
                continue
            if not allowed(importer, target):
                bad.append(f"{importer} ({layer(importer)}) imports {target} ({layer(target)})")
    return bad


def test_no_layer_imports_one_above_it_and_no_service_imports_another():
    modules = {name: imports_of(path) for name, path in project_modules().items()}
    assert len(modules) > 60
    assert not violations(modules), "\n".join(violations(modules))


def test_the_package_root_holds_only_the_entry_points_and_the_client():
    root = {
        n
        for n in project_modules()
        if n.count(".") == 1
        and n.split(".")[1] not in (*SERVICES, "core", "rpc", "stream", "runtime", "apps")
    }
    assert root | {"tgnstream"} <= ROOT_MODULES, f"modules at the package root: {sorted(root - ROOT_MODULES)}"


@pytest.mark.parametrize(
    "importer, imported",
    [
        ("tgnstream.ingest.loop", "tgnstream.model_server.servicer"),  # a service imports another
        ("tgnstream.trainer.service", "tgnstream.ingest.dlq"),
        ("tgnstream.runtime.live", "tgnstream.apps.serve"),  # below the apps, importing the apps
        ("tgnstream.runtime.hot_swap", "tgnstream.trainer.config"),  # runtime importing a service
        ("tgnstream.core.engine", "tgnstream.stream.records"),  # core importing the project
        ("tgnstream.stream.reader", "tgnstream.runtime.metrics"),
        ("tgnstream.client", "tgnstream.core.engine"),
        ("tgnstream.widgets", "tgnstream.core.engine"),  # a module in no layer
    ],
)
def test_the_check_catches_each_kind_of_violation(importer, imported):
    assert violations({importer: {imported}})


def test_the_check_accepts_the_allowed_directions():
    ok = {
        "tgnstream.apps.serve": {"tgnstream.ingest.loop", "tgnstream.model_server.grpc_server"},
        "tgnstream.ingest.loop": {
            "tgnstream.runtime.live",
            "tgnstream.stream.records",
            "tgnstream.core.step",
        },
        "tgnstream.runtime.hot_swap": {"tgnstream.stream.reader", "tgnstream.core.engine"},
        "tgnstream.client": {"tgnstream.rpc.limits"},
    }
    assert not violations(ok)
