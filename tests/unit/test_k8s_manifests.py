"""deploy/k8s/: every manifest validates offline against the Kubernetes API schemas of a fixed
version (kubernetes-validate, strict: unknown fields are errors), the ServiceMonitor (a Prometheus
Operator CRD the validator does not know) against a structural schema, and the manifests agree
with each other and with the configs they carry: the StatefulSet's serviceName is headless, every
selector selects pods, every ConfigMap, Secret, claim and port they name exists, every
TGNSTREAM_* variable is a real setting, the memory limit covers the configured readers."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOC = ROOT / "docs" / "deploy-kubernetes.md"

#: The Kubernetes version the manifests are validated against (the oldest the bundled schemas of
#: kubernetes-validate 1.37 cover; the fields used here are all GA there).
K8S_VERSION = "1.30"
#: Kinds that are CRDs (validated structurally below, not by kubernetes-validate).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
#: Memory budget of the serving process without readers, and of one reader (~330 MB RSS measured;
#: grpc.readers' own description budgets 350 MB).
SERVER_BASE_BYTES = 1.5 * 2**30
READER_BYTES = 350e6
#: The server's bounded stop after SIGTERM where its config has no stop_grace_s (its default).
BOUNDED_STOP_S = 8.0
IMAGE_UID = 1000
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet", "ReplicaSet"}


@dataclass(frozen=True)
class Doc:
    path: str  # relative to deploy/k8s
    index: int
    body: dict

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def example(self) -> bool:
        """Examples document what to create; they are never applied as they are."""
        return PurePosixPath(self.path).parts[0] == "examples"

    def __str__(self) -> str:
        return f"{self.path}#{self.index} {self.kind}/{self.name}"


def _load() -> list[Doc]:
    docs = []
    for f in sorted(K8S.rglob("*.y*ml")):
        rel = f.relative_to(K8S).as_posix()
        for i, body in enumerate(yaml.safe_load_all(f.read_text())):
            if body is not None:
                assert isinstance(body, dict) and {"apiVersion", "kind", "metadata"} <= body.keys(), (
                    f"{rel}#{i}: not a Kubernetes object"
                )
                docs.append(Doc(rel, i, body))
    return docs


DOCS = _load()
APPLIED = [d for d in DOCS if not d.example]


def _find(kind: str, name: str | None = None, docs: list[Doc] = APPLIED) -> list[Doc]:
    return [d for d in docs if d.kind == kind and (name is None or d.name == name)]


def _one(kind: str, name: str | None = None) -> Doc:
    (doc,) = _find(kind, name)
    return doc


def _workloads() -> list[Doc]:
    return [d for d in APPLIED if d.kind in WORKLOADS]


def _pod(doc: Doc) -> dict:
    return doc.body["spec"]["template"]


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) or a Service's plain selector."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _selected(selector: dict) -> list[Doc]:
    return [w for w in _workloads() if _matches(selector, _pod(w)["metadata"].get("labels", {}))]


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_FACTOR = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_FACTOR.update({s: 2 ** (10 * (i + 1)) for i, s in enumerate(["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"])})


def _quantity(q: str | int) -> float:
    m = _QUANTITY.match(str(q))
    assert m, f"{q!r} is not a Kubernetes quantity"
    return float(m.group(1)) * _FACTOR[m.group(2)]


# ---------------------------------------------------------------------------------- schemas
@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate: the test extra)",
    )


@pytest.mark.parametrize("doc", [d for d in DOCS if (d.body["apiVersion"], d.kind) not in CRD_KINDS], ids=str)
def test_manifest_validates_against_the_kubernetes_schema(kv, doc):
    try:
        kv.validate(doc.body, K8S_VERSION, strict=True)
    except kv.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc}: {where}: {e.message} (Kubernetes {K8S_VERSION} schema, strict)")
    except kv.SchemaNotFoundError as e:
        pytest.fail(f"{doc}: {e.message}; a CRD? add it to CRD_KINDS with a structural schema")


def test_strict_validation_rejects_what_the_api_server_would(kv):
    """The validator is not a no-op: a misspelt field and a string port are errors."""
    sts = _one("StatefulSet").body
    typo = copy.deepcopy(sts)
    typo["spec"]["serviceNam"] = typo["spec"].pop("serviceName")
    bad_port = copy.deepcopy(sts)
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    for broken in (typo, bad_port):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, K8S_VERSION, strict=True)


_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
#: The part of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) used here;
#: unknown fields are errors, as the API server's structural schema would prune or refuse them.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("doc", [d for d in DOCS if (d.body["apiVersion"], d.kind) in CRD_KINDS], ids=str)
def test_crd_objects_have_the_structure_of_their_crd(doc):
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed (it comes with kubernetes-validate)"
    )
    errors = sorted(
        jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(doc.body),
        key=lambda e: list(e.path),
    )
    assert not errors, [f"{doc}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------- references
def test_the_expected_objects_are_there():
    have = {(d.kind, d.name) for d in APPLIED}
    assert {
        ("StatefulSet", "tgnstream-server"),
        ("Service", "tgnstream-server-headless"),
        ("Service", "tgnstream-server"),
        ("PodDisruptionBudget", "tgnstream-server"),
        ("Deployment", "tgnstream-trainer"),
        ("Service", "tgnstream-trainer"),
        ("ConfigMap", "tgnstream-config"),
        ("PersistentVolumeClaim", "tgnstream-models"),
        ("PersistentVolumeClaim", "tgnstream-trainer"),
        ("ServiceMonitor", "tgnstream"),
    } <= have
    names = [(d.kind, d.name) for d in APPLIED]
    assert len(names) == len(set(names)), "two objects of one kind with one name"


def test_statefulset_service_is_headless_and_lists_only_ready_pods():
    sts = _one("StatefulSet")
    svc = _find("Service", sts.body["spec"]["serviceName"])
    assert svc, f"{sts}: serviceName {sts.body['spec']['serviceName']!r} names no Service"
    spec = svc[0].body["spec"]
    assert spec.get("clusterIP") == "None", f"{svc[0]}: the StatefulSet's serviceName must be headless"
    assert not spec.get("publishNotReadyAddresses"), "round_robin clients would reach pods catching up"
    assert _matches(spec["selector"], _pod(sts)["metadata"]["labels"]), f"{svc[0]} does not select {sts}"


def test_workload_selectors_match_their_pod_templates():
    for w in _workloads():
        assert _matches(w.body["spec"]["selector"], _pod(w)["metadata"]["labels"]), str(w)


def test_every_service_selects_pods_that_have_its_target_ports():
    for svc in _find("Service"):
        pods = _selected(svc.body["spec"]["selector"])
        assert pods, f"{svc}: its selector matches no pod template"
        for w in pods:
            ports = {
                p["name"]: p["containerPort"]
                for c in _pod(w)["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for p in svc.body["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                assert target in ports or target in ports.values(), f"{svc}: port {target} not on {w}"
                if svc.body["spec"].get("clusterIP") == "None":  # clients dial the pod's port itself
                    assert p["port"] == ports.get(target, target), f"{svc}: {p} differs from the pod's port"


def test_probe_ports_exist_on_their_container():
    for w in _workloads():
        for c in _containers(_pod(w)["spec"]):
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    action = next(c[probe][a] for a in ("httpGet", "tcpSocket", "grpc") if a in c[probe])
                    port = action["port"]
                    assert port in ports or port in ports.values(), f"{w}: {c['name']} {probe} port {port}"


def _secret_refs(pod_spec: dict):
    """(name, key or None, optional) of every Secret a pod reads."""
    for vol in pod_spec.get("volumes", []):
        if "secret" in vol:
            s = vol["secret"]
            keys = [i["key"] for i in s.get("items", [])] or [None]
            yield from ((s["secretName"], k, bool(s.get("optional"))) for k in keys)
    for c in _containers(pod_spec):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], ref["key"], bool(ref.get("optional"))
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                yield src["secretRef"]["name"], None, bool(src["secretRef"].get("optional"))


def _example_secrets() -> dict[str, dict]:
    out = {}
    for d in DOCS:
        if d.kind == "Secret":
            assert d.example, f"{d}: a Secret with real values does not belong in the repository"
            out[d.name] = {**d.body.get("data", {}), **d.body.get("stringData", {})}
    return out


def test_configmaps_secrets_and_claims_referenced_exist():
    config_maps = {d.name: d.body.get("data", {}) for d in _find("ConfigMap")}
    claims = {d.name for d in _find("PersistentVolumeClaim")}
    examples = _example_secrets()
    for w in _workloads():
        spec = _pod(w)["spec"]
        templates = {t["metadata"]["name"] for t in w.body["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for vol in volumes.values():
            if "configMap" in vol:
                cm = vol["configMap"]
                assert cm["name"] in config_maps or cm.get("optional"), f"{w}: ConfigMap {cm['name']}"
                for item in cm.get("items", []):
                    assert item["key"] in config_maps.get(cm["name"], {}), f"{w}: {cm['name']}/{item['key']}"
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, f"{w}: claim {vol}"
        for c in _containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in templates, f"{w}: mount {m['name']} has no volume"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in config_maps.get(ref["name"], {}), f"{w}: {e['name']}"
        for name, key, optional in _secret_refs(spec):
            # No Secret ships with the manifests: each one the pods read must be optional (the pod
            # starts without it) and documented, key by key, in examples/secrets.example.yaml.
            assert optional, f"{w}: Secret {name} is not optional, and none is applied with the manifests"
            assert name in examples, f"{w}: Secret {name} is missing from examples/secrets.example.yaml"
            assert key is None or key in examples[name], f"{w}: key {name}/{key} missing from the example"


def test_example_secrets_are_placeholders_and_documented():
    doc = DOC.read_text()
    for name, data in _example_secrets().items():
        for key, value in data.items():
            assert "REPLACE-ME" in value or key in ("security_protocol", "sasl_mechanism"), f"{name}/{key}"
        assert name in doc, f"docs/deploy-kubernetes.md does not say how to create Secret {name}"


def test_pdb_selects_the_servers_and_lets_a_drain_proceed():
    pdb = _one("PodDisruptionBudget")
    (sts,) = _selected(pdb.body["spec"]["selector"])
    assert sts.kind == "StatefulSet", f"{pdb} selects {sts}"
    replicas = sts.body["spec"]["replicas"]
    spec = pdb.body["spec"]
    # The bundled schemas carry no enums: the API server's own check of this one.
    assert spec.get("unhealthyPodEvictionPolicy", "IfHealthyBudget") in ("IfHealthyBudget", "AlwaysAllow")
    if "minAvailable" in spec:
        assert isinstance(spec["minAvailable"], int) and spec["minAvailable"] < replicas, (
            "no eviction possible"
        )
    else:
        assert spec["maxUnavailable"] not in (0, "0%"), "no eviction possible"
    for d in _find("PodDisruptionBudget"):  # a budget on the single trainer would block every drain
        assert all(w.body["spec"].get("replicas", 1) > 1 for w in _selected(d.body["spec"]["selector"])), str(
            d
        )


def test_servicemonitor_scrapes_each_component_once_on_its_metrics_port():
    sm = _one("ServiceMonitor")
    services = [
        s for s in _find("Service") if _matches(sm.body["spec"]["selector"], s.body["metadata"]["labels"])
    ]
    scraped: list[str] = []
    for svc in services:
        names = {p["name"] for p in svc.body["spec"]["ports"]}
        for ep in sm.body["spec"]["endpoints"]:
            assert ep["port"] in names, f"{sm}: {svc} has no port named {ep['port']}"
        scraped += [w.name for w in _selected(svc.body["spec"]["selector"])]
    assert sorted(scraped) == sorted(w.name for w in _workloads()), f"scraped: {scraped}"


def test_pods_run_as_the_image_user_with_writable_volumes():
    for w in _workloads():
        spec = _pod(w)["spec"]
        sc = spec["securityContext"]
        assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == IMAGE_UID and sc["runAsNonRoot"], str(
            w
        )
        assert spec.get("enableServiceLinks") is False, (
            f"{w}: Service links add TGNSTREAM_* look-alike variables"
        )
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], str(w)
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            if csc.get("readOnlyRootFilesystem"):
                assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly"), f"{w}: /tmp not writable"
            assert not mounts["/data"].get("readOnly"), f"{w}: /data must be writable"


def test_every_container_has_memory_requests_and_limits():
    for w in _workloads():
        for c in _containers(_pod(w)["spec"]):
            res = c["resources"]
            req, lim = _quantity(res["requests"]["memory"]), _quantity(res["limits"]["memory"])
            assert 0 < req <= lim, f"{w}: memory request {req} above limit {lim}"
            _quantity(res["requests"]["cpu"])


# ------------------------------------------------------------------------ configs in pods
def _config_file(doc: Doc, tmp_path: Path) -> Path:
    """The config file the container's args name, written from the ConfigMap it mounts."""
    (c,) = _pod(doc)["spec"]["containers"]
    path = PurePosixPath(c["args"][c["args"].index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert str(path.parent) in mounts, f"{doc}: {path} is not on a mounted volume"
    volume = next(v for v in _pod(doc)["spec"]["volumes"] if v["name"] == mounts[str(path.parent)])
    data = _one("ConfigMap", volume["configMap"]["name"]).body["data"]
    assert path.name in data, f"{doc}: {path.name} is not a key of the ConfigMap"
    out = tmp_path / path.name
    out.write_text(data[path.name])
    return out


_EXPORT = re.compile(r"^\s*export\s+([A-Z0-9_]+)=(\S+)\s*$", re.M)


def _environment(doc: Doc) -> dict[str, str]:
    """Every TGNSTREAM_* variable the container can get: literal values, Secret keys (with the
    example's values) and what its start script exports."""
    (c,) = _pod(doc)["spec"]["containers"]
    examples = _example_secrets()
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = examples[ref["name"]][ref["key"]]
    script = " ".join(c.get("command", []))
    env.update(_EXPORT.findall(script))
    return {k: v for k, v in env.items() if k.startswith("TGNSTREAM_")}


def _setting(config, var: str, prefix: str):
    value = config
    for part in var.removeprefix(prefix).lower().split("__"):
        assert hasattr(value, part), f"{var}: no setting {part!r} (a typo is silently ignored)"
        value = getattr(value, part)
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_env_overrides_and_secret_files_name_real_settings(kind, tmp_path, monkeypatch):
    from tgnstream.apps.serve_config import load_serve_config
    from tgnstream.trainer.continual_config import load_trainer_config

    doc = _one(kind)
    load, prefix = (
        (load_serve_config, "TGNSTREAM_SERVE_")
        if kind == "StatefulSet"
        else (load_trainer_config, "TGNSTREAM_TRAINER_")
    )
    path = _config_file(doc, tmp_path)
    env = _environment(doc)
    assert env, f"{doc}: no Secret wiring"
    for var, value in env.items():
        assert var.startswith(prefix), f"{doc}: {var} is not read by this process"
        monkeypatch.setenv(var, value)
    config = load(path)  # a nested typo or a bad value (e.g. security_protocol) fails here
    for var, value in env.items():
        assert _setting(config, var, prefix) == value, var
    # Files the start script points at lie on a mounted Secret that has that key.
    (c,) = _pod(doc)["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(doc)["spec"]["volumes"]}
    examples = _example_secrets()
    script = " ".join(c.get("command", []))
    for var, value in _EXPORT.findall(script):
        file = PurePosixPath(value)
        secret = volumes[mounts[str(file.parent)]]["secret"]["secretName"]
        assert file.name in examples[secret], f"{var}: {secret} has no key {file.name}"
    if script:  # the process, not the shell, must get SIGTERM
        assert re.search(r'^\s*exec tgnstream "\$@"\s*$', script, re.M), f"{doc}: the script must exec"


def test_server_memory_covers_its_readers_and_grace_covers_its_stop(tmp_path):
    from tgnstream.apps.serve_config import load_serve_config

    sts = _one("StatefulSet")
    serve = load_serve_config(_config_file(sts, tmp_path))
    readers = serve.grpc.readers
    assert readers is not None, "grpc.readers must be explicit: the memory limit is sized for it"
    spec = _pod(sts)["spec"]
    (c,) = spec["containers"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")["emptyDir"]
    assert shm["medium"] == "Memory" and "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}
    need = SERVER_BASE_BYTES + readers * READER_BYTES + _quantity(shm["sizeLimit"])
    limit = _quantity(c["resources"]["limits"]["memory"])
    assert limit >= need, (
        f"memory limit {limit / 2**30:.2f} GiB < {need / 2**30:.2f} GiB for {readers} readers"
    )
    assert _quantity(c["resources"]["requests"]["cpu"]) >= readers, "a core per reader"
    grace = spec["terminationGracePeriodSeconds"]
    stop = getattr(serve, "stop_grace_s", BOUNDED_STOP_S)  # gRPC drain, ingest stop, final snapshot
    assert grace >= stop + 10, f"terminationGracePeriodSeconds {grace} s leaves no margin over {stop} s"


def test_the_round_robin_example_names_the_headless_service():
    headless = next((s.name for s in _find("Service") if s.body["spec"].get("clusterIP") == "None"), None)
    assert headless, "no headless Service"
    target = f"dns:///{headless}.<namespace>.svc.cluster.local:50051"
    for text in ((K8S / "server.yaml").read_text(), DOC.read_text()):
        assert target in text and '{"loadBalancingConfig": [{"round_robin": {}}]}' in text
