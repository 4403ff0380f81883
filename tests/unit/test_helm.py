"""deploy/helm/vramgate, offline: ``helm lint`` and ``helm template`` through Helm's own Go code
(helm-python-sdk, which carries it as a shared library), every rendered manifest against the
Kubernetes API schemas (kubernetes-validate, strict), the values schema (jsonschema, and Helm
applying it), and what the templates make of the values: one gateway pod per node with its GPUs, the
router's static workers, keys from a Secret, the cache volume, the probes, and monitoring objects
that carry deploy/alerts.yml and the Grafana dashboard unchanged. No cluster is involved."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from server import cli
from server.auth import ApiKey, AuthConfig, required
from server.configload import parse_settings
from server.errors import ConfigError
from server.models import embedded_models

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "vramgate"
EXAMPLES = sorted((DEPLOY / "helm" / "examples").glob("*.yaml"))
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 ships
# Prometheus Operator CRDs: not in Kubernetes' schemas; checked against CRD_SCHEMAS below instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
RELEASE, NAMESPACE = "rel", "ns"
FULL = "rel-vramgate"

EVERYTHING = {  # every optional object on, to validate them all
    "serviceMonitor": {"enabled": True, "labels": {"release": "kps"},
                       "authorization": {"type": "Bearer",
                                         "credentials": {"name": "k", "key": "metrics-key"}}},
    "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True},
    "auth": {"apiKeys": ["sk-a", "sk-b"], "adminKey": "sk-admin", "hfToken": "hf_x"},
    "cache": {"type": "emptyDir", "emptyDir": {"sizeLimit": "100Gi"}},
    "resources": {"requests": {"cpu": "4", "memory": "32Gi"}},
    "nodeSelector": {"gpu": "yes"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
    "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
    "imagePullSecrets": [{"name": "regcred"}], "runtimeClassName": "nvidia",
    "podAnnotations": {"a": "b"}, "podLabels": {"team": "ml"},
    "router": {"extraArgs": ["--disable-retries"], "resources": {"limits": {"memory": "1Gi"}}},
}
VARIANTS = {"default": None, "everything": EVERYTHING,
            **{p.stem: yaml.safe_load(p.read_text()) for p in EXAMPLES}}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (the API server would take the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(CHART)


def render(chart, values=None) -> list[dict]:
    """``helm template rel deploy/helm/vramgate -n ns`` with ``values``: the manifests, parsed."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def gateway_container(docs):
    return one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def worker_urls(docs) -> list[str]:
    args = one(docs, "Deployment", f"{FULL}-router")["spec"]["template"]["spec"]["containers"][0]["args"]
    start = args.index("--worker-urls") + 1
    rest = args[start:]
    return rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


# --- lint, template, Kubernetes schemas -------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_is_clean(variant):
    report = helm.lint(CHART, VARIANTS[variant], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Info lines (such as "icon is recommended") only: no warning, no error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_passes_the_kubernetes_schema(chart, variant):
    docs = render(chart, VARIANTS[variant])
    assert {"StatefulSet", "Service", "ConfigMap"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_kubernetes_schemas_are_the_newest_shipped():
    newest = max(kubernetes_validate.utils.all_versions(), key=lambda v: tuple(map(int, v.split("."))))
    assert K8S_VERSION == newest


def test_everything_variant_renders_every_kind(chart):
    kinds = sorted(d["kind"] for d in render(chart, EVERYTHING))
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "PrometheusRule", "Secret",
                            "Service", "Service", "Service", "ServiceMonitor", "ServiceMonitor",
                            "StatefulSet"])


# --- values.schema.json -----------------------------------------------------------------------------

def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_values_schema_accepts_defaults_and_examples(chart, variant):
    validator = jsonschema.Draft7Validator(schema())
    validator.check_schema(schema())
    validator.validate(chart.merge_values(VARIANTS[variant]))  # what Helm checks
    validator.validate(VARIANTS[variant] or {})  # the file alone


def test_values_schema_covers_exactly_the_documented_values():
    """Every key of values.yaml is in the schema (additionalProperties is false, so the defaults
    passing shows that) and every setting the schema names is in values.yaml with a default to read;
    only the shared shapes (image, resources, probe timing) and maps left empty by default
    (affinity) list more fields than values.yaml spells out."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node, values, where):
        props = node.get("properties")
        if props is None or not values:
            return
        assert node.get("additionalProperties") is False, where
        missing = set(props) - set(values) - {"global"}
        assert not missing, f"{where}: in the schema but not in values.yaml: {missing}"
        for key, sub in props.items():
            if "$ref" not in sub:
                walk(sub, values.get(key), f"{where}.{key}")

    walk(schema(), defaults, "values")


@pytest.mark.parametrize("bad", [
    {"replicas": "two"}, {"replica": 3}, {"gpus": -1}, {"cache": {"type": "nfs"}},
    {"auth": {"apiKeys": ["sk-a,sk-b"]}}, {"router": {"policy": "fastest"}},
    {"shmSize": "lots"}, {"serviceMonitor": {"interval": "often"}},
])
def test_helm_refuses_values_outside_the_schema(chart, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chart.merge_values(bad), schema())
    with pytest.raises(helm.HelmValuesError, match="schema"):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, bad, strict=True)
    assert any(m["severity"] == 3 and "schema" in m["error"] for m in report["messages"]), report


# --- what the templates do -------------------------------------------------------------------------

def test_router_lists_every_gateway_pod_by_its_stable_name(chart):
    docs = render(chart, {"replicas": 3})
    sts, headless = one(docs, "StatefulSet"), one(docs, "Service", f"{FULL}-headless")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert sts["spec"]["replicas"] == 3
    assert worker_urls(docs) == [f"http://{FULL}-{i}.{FULL}-headless.{NAMESPACE}.svc.cluster.local:8000"
                                 for i in range(3)]
    assert worker_urls(render(chart, {"replicas": 1, "clusterDomain": "k8s.lan"})) == [
        f"http://{FULL}-0.{FULL}-headless.{NAMESPACE}.svc.k8s.lan:8000"]
    router = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert router["command"] == ["vllm-router"]
    assert {"--host=0.0.0.0", "--port=8000", "--policy=cache_aware",
            "--health-check-endpoint=/health", "--worker-startup-timeout-secs=600"} <= set(router["args"])
    # It listens only once a gateway is healthy: the startup probe outwaits its startup timeout.
    startup = router["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > 600


def test_router_can_be_left_out(chart):
    docs = render(chart, {"router": {"enabled": False}, "serviceMonitor": {"enabled": True}})
    assert not [d for d in docs if d["metadata"]["name"].endswith("-router")]


def test_one_gateway_per_node_with_its_gpus(chart):
    docs = render(chart, {"replicas": 4, "gpus": 8, "nodeSelector": {"pool": "h100"},
                          "resources": {"requests": {"cpu": "32"}, "limits": {"memory": "500Gi"}}})
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [t["topologyKey"] for t in anti] == ["kubernetes.io/hostname"]
    selector = anti[0]["labelSelector"]["matchLabels"]
    assert selector == sts["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["nodeSelector"] == {"pool": "h100"}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    res = gateway_container(docs)["resources"]
    assert res == {"requests": {"cpu": "32", "nvidia.com/gpu": 8},
                   "limits": {"memory": "500Gi", "nvidia.com/gpu": 8}}
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(gateway_container(docs))


def test_cpu_mode_requests_no_gpu(chart):
    out = chart.render({"gpus": 0}, name=RELEASE, namespace=NAMESPACE)
    assert "nvidia.com/gpu" not in "".join(out.values())
    container = gateway_container(render(chart, {"gpus": 0}))
    assert "resources" not in container
    assert env_of(container)["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_no_keys_no_secret(chart):
    docs = render(chart)
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [v for v in env_of(gateway_container(docs)).values() if isinstance(v, dict)]


def test_keys_come_from_the_charts_secret(chart):
    docs = render(chart, {"auth": {"apiKeys": ["sk-a", "sk-b"], "adminKey": "sk-admin"}})
    secret = one(docs, "Secret", FULL)
    assert secret["stringData"] == {"api-keys": "sk-a,sk-b", "admin-key": "sk-admin"}
    env = env_of(gateway_container(docs))
    assert env["VRAMGATE_API_KEYS"]["secretKeyRef"] == {"name": FULL, "key": "api-keys", "optional": True}
    assert env["VRAMGATE_ADMIN_KEY"]["secretKeyRef"]["key"] == "admin-key"
    assert "checksum/secret" in one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    cm = one(docs, "ConfigMap", FULL)
    assert "sk-a" not in json.dumps(cm)


def test_existing_secret_is_used_when_set(chart):
    docs = render(chart, {"auth": {"existingSecret": "mine", "apiKeys": ["ignored"],
                                   "existingSecretKeys": {"apiKeys": "keys"}}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_of(gateway_container(docs))
    assert env["VRAMGATE_API_KEYS"]["secretKeyRef"] == {"name": "mine", "key": "keys", "optional": True}
    assert env["VRAMGATE_ADMIN_KEY"]["secretKeyRef"] == {"name": "mine", "key": "admin-key", "optional": True}
    assert env["HF_TOKEN"]["secretKeyRef"]["name"] == "mine"
    assert "checksum/secret" not in one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_cli_accepts_the_pods_command_and_config(chart, variant, tmp_path, monkeypatch):
    """The container's command, args and environment (Secret values resolved) run through the real
    `vramgate` CLI up to loading the settings, with the ConfigMap's file as --config."""
    docs = render(chart, VARIANTS[variant])
    container = gateway_container(docs)
    assert container["command"] == ["vramgate", "serve"]
    config = tmp_path / "config.yaml"
    config.write_text(one(docs, "ConfigMap", FULL)["data"]["config.yaml"])
    secret = next((d["stringData"] for d in docs if d["kind"] == "Secret"), {})
    env = {"VRAMGATE_CONFIG": None, "VRAMGATE_HOST": None, "VRAMGATE_PORT": None}
    for name, value in env_of(container).items():
        env[name] = secret.get(value["secretKeyRef"]["key"]) if isinstance(value, dict) else value
    seen = {}
    real = cli.load_settings

    def load(path, **kw):  # the real loader on the ConfigMap's file, then stop before serving
        assert path == Path("/etc/vramgate/config.yaml")
        seen["settings"] = real(config, **kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "load_settings", load)
    result = CliRunner().invoke(cli.main, [*container["command"][1:], *container["args"]], env=env)
    assert "config: stop here" in result.output, result.output
    settings = seen["settings"]
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert str(settings.data_dir) == env["VRAMGATE_DATA_DIR"]
    keys = [k for k in secret.get("api-keys", "").split(",") if k]
    assert [k.key for k in settings.auth.api_keys if k.name.startswith("env-")] == keys
    assert settings.auth.admin_key == (secret.get("admin-key") or None)
    assert settings.models  # the file's models, or the embedded ones


def test_image_command_port_and_paths_match_the_dockerfile(chart):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 8000" in dockerfile
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entry[:2] == gateway_container(render(chart))["command"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_map_holds_config_the_gateway_accepts(chart, variant):
    docs = render(chart, VARIANTS[variant])
    raw = yaml.safe_load(one(docs, "ConfigMap", FULL)["data"]["config.yaml"])
    assert raw == (VARIANTS[variant] or {}).get("config", {})
    assert parse_settings(raw, default_models=embedded_models).models


def test_a_config_change_rolls_the_pods_unless_told_not_to(chart):
    def annotations(values):
        return one(render(chart, values), "StatefulSet")["spec"]["template"]["metadata"].get(
            "annotations") or {}
    a = annotations({"config": {"max_loaded_models": 2}})["checksum/config"]
    assert a != annotations({"config": {"max_loaded_models": 3}})["checksum/config"]
    assert "checksum/config" not in annotations({"rollOnConfigChange": False})
    mounts = {m["name"]: m for m in gateway_container(render(chart))["volumeMounts"]}
    assert "subPath" not in mounts["config"]  # a directory mount: updates reach the pod


def test_cache_on_a_claim_per_pod(chart):
    docs = render(chart, {"cache": {"pvc": {"size": "1Ti", "storageClassName": "fast"}}})
    sts = one(docs, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert claim["spec"]["storageClassName"] == "fast"
    assert "cache" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    env = env_of(gateway_container(docs))
    assert env["HF_HOME"] == "/var/cache/vramgate/huggingface"
    assert env["VRAMGATE_DATA_DIR"] == "/var/cache/vramgate/data"


def test_cache_on_the_nodes_disk(chart):
    docs = render(chart, {"cache": {"type": "hostPath", "mountPath": "/cache", "persistData": False,
                                    "hostPath": {"path": "/mnt/nvme/models"}}})
    sts = one(docs, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["hostPath"] == {"path": "/mnt/nvme/models", "type": "DirectoryOrCreate"}
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(docs)["volumeMounts"]}
    assert mounts["cache"] == "/cache"
    env = env_of(gateway_container(docs))
    assert env["HF_HOME"] == "/cache/huggingface" and "VRAMGATE_DATA_DIR" not in env


def test_probes_ask_the_gateways_open_health_route(chart):
    docs = render(chart)
    container = gateway_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    from server.admin import routes
    assert any(r.path == "/health" and "GET" in r.methods for r in routes)
    assert required(AuthConfig(api_keys=(ApiKey("k"),), admin_key="a"), "/health") == "none"


def test_services_select_the_pods_they_serve(chart):
    docs = render(chart, EVERYTHING)
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"].items()
        (target,) = [w for w in workloads if sel <= w["spec"]["template"]["metadata"]["labels"].items()]
        names = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names, svc["metadata"]["name"]


# --- monitoring: the same rules and dashboard as deploy/ --------------------------------------------

def test_chart_copies_equal_deploy_files():
    """Helm reads no file outside the chart, so the chart carries copies; they must not drift.
    After editing deploy/alerts.yml or the dashboard: cp them into deploy/helm/vramgate/files/."""
    assert (CHART / "files" / "alerts.yml").read_bytes() == (DEPLOY / "alerts.yml").read_bytes()
    theirs = sorted(p.name for p in (DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert sorted(p.name for p in (CHART / "files" / "dashboards").glob("*.json")) == theirs
    for name in theirs:
        assert (CHART / "files" / "dashboards" / name).read_bytes() == \
            (DEPLOY / "grafana" / "dashboards" / name).read_bytes()


def test_prometheus_rule_carries_the_alert_rules(chart):
    rule = one(render(chart, {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}),
               "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((DEPLOY / "alerts.yml").read_text())


def test_grafana_dashboard_config_map(chart):
    docs = render(chart, {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    cm = one(docs, "ConfigMap", f"{FULL}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    for name in cm["data"]:
        assert json.loads(cm["data"][name]) == json.loads(
            (DEPLOY / "grafana" / "dashboards" / name).read_text())
    assert set(cm["data"]) == {p.name for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")}


def test_service_monitor_scrapes_each_gateway_once_as_job_vramgate(chart):
    docs = render(chart, {"serviceMonitor": {"enabled": True}})
    monitor = one(docs, "ServiceMonitor", FULL)
    sel = monitor["spec"]["selector"]["matchLabels"].items()
    services = [d for d in docs if d["kind"] == "Service" and sel <= d["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == [FULL]  # not the headless one too
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    job = services[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    alerts = (DEPLOY / "alerts.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', alerts)) == {job}
    router_monitor = one(docs, "ServiceMonitor", f"{FULL}-router")
    assert router_monitor["spec"]["endpoints"][0]["port"] == "metrics"


def _crd(spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False, "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
                "metadata": {"type": "object", "required": ["name", "labels"], "additionalProperties": False,
                             "properties": {"name": {"type": "string"}, "labels": {"type": "object"},
                                            "namespace": {"type": "string"}}},
                "spec": spec}}


_STR = {"type": "string"}
CRD_SCHEMAS = {  # the fields of the Prometheus Operator's CRDs the chart uses, strictly
    "ServiceMonitor": _crd({
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
        "properties": {
            "jobLabel": _STR, "selector": {"type": "object", "required": ["matchLabels"]},
            "namespaceSelector": {"type": "object", "properties": {"matchNames": {
                "type": "array", "items": _STR}}, "additionalProperties": False},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": _STR, "path": _STR,
                               "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                               "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                               "authorization": {"type": "object", "additionalProperties": False,
                                                 "properties": {"type": _STR,
                                                                "credentials": {"type": "object"}}}}}}}}),
    "PrometheusRule": _crd({
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": _STR, "interval": _STR, "rules": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                "properties": {"alert": _STR, "expr": _STR, "for": _STR,
                               "labels": {"type": "object", "additionalProperties": _STR},
                               "annotations": {"type": "object", "additionalProperties": _STR}}}}}}}}}),
}


def test_crd_checks_refuse_a_wrong_field():
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
           "metadata": {"name": "x", "labels": {}},
           "spec": {"selector": {"matchLabels": {}}, "endpoints": [{"port": "http", "intervall": "1s"}]}}
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(doc, CRD_SCHEMAS["ServiceMonitor"])
