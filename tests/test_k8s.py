"""Kubernetes manifests (issue 11, section 2): every kustomization renders, every object validates against the
Kubernetes OpenAPI schemas offline (kubernetes-validate, strict: unknown fields fail), the Prometheus Operator
objects pass a structural check, and the invariants hold: non-root, read-only root filesystems with writable
volumes wherever the processes write, probes, GPUs where they belong, the Indexed Job's shards, the HPA's metric,
real metric names in alerts and dashboard, real CLI command lines. Alert rules pass `promtool check rules` and
their unit tests (`promtool test rules`).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
MONITORING = K8S / "components" / "monitoring"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
# Every kustomization a user applies (overlays/gpu-triton is the only way the Triton component renders).
TARGETS = {"cpu-demo": "overlays/cpu-demo", "gpu": "overlays/gpu", "gpu-triton": "overlays/gpu-triton",
           "bulk-augment": "bulk-augment"}
# The oldest Kubernetes the manifests target (backoffLimitPerIndex is on by default from 1.29) and the newest
# schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# Secrets the production overlays expect the operator to create (k8s/README.md); the demo brings its own.
EXTERNAL_SECRETS = {"cxrgen-store", "cxrgen-api-keys", "cxrgen-admin-key"}
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob")



@functools.lru_cache(maxsize=None)
def _kustomize_major() -> int:
    """The major version of kubectl's built-in kustomize (0 without kubectl)."""
    try:
        out = subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
        return int(json.loads(out.stdout)["kustomizeVersion"].lstrip("v").split(".")[0])
    except (OSError, ValueError, KeyError, subprocess.SubprocessError):
        return 0




@functools.lru_cache(maxsize=None)
def _render(target: str) -> str:
    if _kustomize_major() < 5:  # tests that render skip; the others (scripts, promtool) still run
        pytest.skip("needs kubectl with its built-in kustomize v5 (components, labels) to render k8s/; not found")
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / TARGETS[target])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {TARGETS[target]}: {out.stderr}"
    return out.stdout


def render(target: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render(target)) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(obj: dict, name: str) -> dict:
    return next(c for c in containers(obj) if c["name"] == name)


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def all_workloads():
    for target in TARGETS:
        for d in render(target):
            if d["kind"] in WORKLOADS:
                yield target, d


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_kubernetes_schemas(target):
    import kubernetes_validate

    docs = render(target)
    assert docs
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRDS:
            continue  # not in the bundled schemas: test_prometheus_operator_objects_are_well_formed
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{target}: {d['kind']}/{d['metadata']['name']} (Kubernetes {version}): "
                            f"{'.'.join(map(str, e.absolute_path))}: {e.message}")


def test_the_validator_rejects_a_misspelt_field():
    """The check above is not vacuous: strict validation fails an unknown or mistyped field."""
    import kubernetes_validate

    dep = find(render("gpu"), "Deployment", "cxrgen")
    kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "120"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_prometheus_operator_objects_are_well_formed():
    """ServiceMonitor and PrometheusRule (CRDs, outside the bundled schemas): the fields the Operator reads, the
    Service they point at, and the PrometheusRule saying what the plain rules file says."""
    for target in ("cpu-demo", "gpu"):
        docs = render(target)
        sm = find(docs, "ServiceMonitor", "cxrgen")
        assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        svc = find(docs, "Service", "cxrgen")
        labels = svc["metadata"]["labels"]
        assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                               "metricRelabelings", "honorLabels"}
            assert ep["port"] in ports and ep["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", ep["interval"])
        rule = find(docs, "PrometheusRule", "cxrgen")
        assert set(rule["spec"]) == {"groups"}
        for group in rule["spec"]["groups"]:
            assert set(group) <= {"name", "interval", "rules"} and group["rules"]
            for r in group["rules"]:
                assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
                assert ("alert" in r) != ("record" in r) and r["expr"].strip()
                assert r.get("labels", {}).get("severity") in ("critical", "warning", "info")
        plain = yaml.safe_load((MONITORING / "alerts.rules.yml").read_text())
        assert rule["spec"] == plain, "prometheusrule.yaml and alerts.rules.yml say different things"


# ----------------------------------------------------------------------------- pods


def test_every_container_is_non_root_with_a_read_only_root_filesystem():
    seen = 0
    for target, obj in all_workloads():
        spec = pod_spec(obj)
        where = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where  # none of them talks to the API server
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) != 0, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (where, c["name"])
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], (where, c["name"])
            seen += 1
    assert seen >= 15


# Environment variables that name folders a process writes (service/config.py, BentoML, the libraries' caches).
WRITES = ("CXRGEN_DATA", "BENTOML_HOME", "HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR",
          "TORCHINDUCTOR_CACHE_DIR")


def writable_mounts(obj: dict, c: dict) -> dict[str, dict]:
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    out = {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        if not m.get("readOnly") and ("emptyDir" in v or "persistentVolumeClaim" in v):
            out[m["mountPath"]] = v
    return out


def under(path: str, mounts) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


@pytest.mark.parametrize("target", ["cpu-demo", "gpu"])
def test_the_server_writes_only_to_volumes(target):
    """With a read-only root filesystem, every place the server writes is a volume: its data folder (the shared
    PVC), BentoML's home (task database, prometheus_multiproc_dir), /tmp (BentoML's Unix sockets, temporary
    files, caches) and a memory-backed /dev/shm; checkpoints come read-only from the models PVC."""
    dep = find(render(target), "Deployment", "cxrgen")
    server = container(dep, "server")
    e, mounts = env(server), writable_mounts(dep, container(dep, "server"))
    for name in WRITES:
        assert e.get(name) and under(e[name], mounts), f"{name}={e.get(name)} is not on a writable volume"
    assert "persistentVolumeClaim" in mounts[e["CXRGEN_DATA"]]  # shared by the replicas
    assert {"/tmp", "/dev/shm"} <= set(mounts)
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    ro = {m["mountPath"]: m for m in server["volumeMounts"] if m.get("readOnly")}
    models = next(p for p, m in ro.items() if m["name"] == "models")
    assert under(e["CXRGEN_MODEL"], [models]) and under(e["CXRGEN_REWARD_DIR"], [models])
    assert e["CXRGEN_API_KEYS_FILE"].startswith(next(p for p, m in ro.items() if m["name"] == "api-keys"))
    # The settings the server reads exist (a misspelt variable would be silently ignored).
    known = set(re.findall(r'"(CXRGEN_[A-Z_]+)"', "".join(p.read_text() for p in (REPO / "service").glob("*.py"))))
    assert {n for n in e if n.startswith("CXRGEN_")} <= known


def test_long_running_pods_have_probes_and_the_server_probes_livez_and_readyz():
    for target in TARGETS:
        for obj in render(target):
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for c in pod_spec(obj)["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, f"{target}: {obj['metadata']['name']}/{c['name']} has no {probe}"
    dep = find(render("gpu"), "Deployment", "cxrgen")
    server = container(dep, "server")
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 until warm (service.py)
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert server["startupProbe"]["httpGet"]["path"] == "/livez"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    triton = container(find(render("gpu-triton"), "Deployment", "cxrgen-triton"), "triton")
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in triton["ports"]


def gpus(c: dict) -> str | None:
    return c["resources"].get("limits", {}).get("nvidia.com/gpu")


def test_gpus_where_they_belong():
    gpu = render("gpu")
    assert gpus(container(find(gpu, "Deployment", "cxrgen"), "server")) == "1"
    assert env(container(find(gpu, "Deployment", "cxrgen"), "server"))["CXRGEN_DEVICE"] == "cuda"
    round_ = container(find(gpu, "CronJob", "cxrgen-alignment-round"), "round")
    assert gpus(round_) == "1" and env(round_)["LOOP_DEVICE"] == "cuda"
    assert gpus(container(find(render("bulk-augment"), "Job", "cxrgen-augment"), "shard")) == "1"
    assert gpus(container(find(render("gpu-triton"), "Deployment", "cxrgen-triton"), "triton")) == "1"
    demo = render("cpu-demo")
    assert not [c["name"] for d in demo if d["kind"] in WORKLOADS for c in containers(d) if gpus(c)]
    assert env(container(find(demo, "Deployment", "cxrgen"), "server"))["CXRGEN_DEVICE"] == "cpu"


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(target):
    """Every Secret, ConfigMap and PVC a pod names is in the rendered output, except the production Secrets an
    operator creates and, for bulk-augment, the models volume of the gpu overlay beside it."""
    docs = render(target)
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    external = {("Secret", s) for s in EXTERNAL_SECRETS} if target != "cpu-demo" else set()
    if target == "bulk-augment":
        external.add(("PersistentVolumeClaim", "cxrgen-models"))
    wanted = set()
    for obj in docs:
        if obj["kind"] not in WORKLOADS:
            continue
        for v in pod_spec(obj).get("volumes", []):
            if "secret" in v:
                wanted.add(("Secret", v["secret"]["secretName"]))
            if "configMap" in v:
                wanted.add(("ConfigMap", v["configMap"]["name"]))
            if "persistentVolumeClaim" in v:
                wanted.add(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
        for c in containers(obj):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    wanted.add(("Secret", ref["secretKeyRef"]["name"]))
                if "configMapKeyRef" in ref:
                    wanted.add(("ConfigMap", ref["configMapKeyRef"]["name"]))
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    wanted.add(("Secret", e["secretRef"]["name"]))
    assert wanted - have <= external, sorted(wanted - have - external)
    if target == "cpu-demo":
        assert not wanted - have  # the demo is self-contained


def test_network_policies():
    docs = render("gpu")
    np = find(docs, "NetworkPolicy", "cxrgen")
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert [p for r in np["spec"]["ingress"] for p in r["ports"]] == [{"port": 3000, "protocol": "TCP"}]
    egress = sorted(p["port"] for r in np["spec"]["egress"] for p in r["ports"])
    assert egress == [53, 53, 5432]  # DNS (UDP and TCP) and PostgreSQL only
    triton = find(render("gpu-triton"), "NetworkPolicy", "cxrgen")
    assert sorted(p["port"] for r in triton["spec"]["egress"] for p in r["ports"]) == [53, 53, 5432, 8000, 8001]
    pg = find(render("cpu-demo"), "NetworkPolicy", "cxrgen-postgres")
    client = pg["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for name in ("Deployment/cxrgen", "Job/cxrgen-migrate", "CronJob/cxrgen-alignment-round"):
        kind, n = name.split("/")
        obj = find(render("cpu-demo"), kind, n)
        tpl = obj["spec"]["jobTemplate"]["spec"]["template"] if kind == "CronJob" else obj["spec"]["template"]
        assert client.items() <= tpl["metadata"]["labels"].items(), f"{name} cannot reach PostgreSQL"


def test_postgres_in_the_demo_and_an_external_url_in_production():
    demo = render("cpu-demo")
    sts = find(demo, "StatefulSet", "cxrgen-postgres")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    store = next(d for d in demo if d["kind"] == "Secret" and d["metadata"]["name"].startswith("cxrgen-store"))
    import base64

    url = base64.b64decode(store["data"]["url"]).decode()
    assert url.startswith("postgresql+psycopg://") and "@cxrgen-postgres:5432/" in url
    assert not [d for d in render("gpu") if d["kind"] in ("StatefulSet", "Secret")]
    # The migration Job runs before the server: the server's initContainer waits for the schema it writes.
    for target in ("cpu-demo", "gpu"):
        docs = render(target)
        assert container(find(docs, "Job", "cxrgen-migrate"), "migrate")["command"] == ["cxrgen", "store", "upgrade"]
        init = pod_spec(find(docs, "Deployment", "cxrgen"))["initContainers"]
        assert init[0]["command"] == ["sh", "/scripts/wait-for-dependencies.sh"]


# ----------------------------------------------------------------------------- scaling, bulk augmentation, loop


def series_of_service() -> dict[str, str]:
    """Prometheus series name -> type, from service/metrics.py's prometheus_client constructors."""
    text = (REPO / "service" / "metrics.py").read_text()
    return {name: kind for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\(\s*"([a-z0-9_]+)"', text)}


def series_of_bentoml() -> dict[str, str]:
    """BentoML's request series, read from the installed BentoML: the namespace of its v2 default configuration
    and the names its RunnerTrafficMetricsMiddleware (the one _bentoml_impl's app installs) registers."""
    import bentoml

    root = Path(bentoml.__file__).parent
    cfg = yaml.safe_load((root / "_internal/configuration/v2/default_configuration.yaml").read_text())
    ns = cfg["services"]["metrics"]["namespace"]
    src = (root / "_internal/server/http/instruments.py").read_text()
    runner = src[src.index("class RunnerTrafficMetricsMiddleware"):]
    found = re.findall(r'metrics_client\.(Counter|Gauge|Histogram)\(\s*namespace=self\.namespace,\s*name="([a-z_]+)"',
                       runner)
    assert found, "BentoML's middleware changed: update the metric names in k8s/"
    return {f"{ns}_{name}": kind for kind, name in found}


def exposed_names() -> set[str]:
    out = set()
    for name, kind in {**series_of_service(), **series_of_bentoml()}.items():
        out |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "Histogram" else {name}
    return out


def metric_names(promql: str) -> set[str]:
    return set(re.findall(r"\b((?:cxrgen|bentoml)_[a-z0-9_]+)\b", promql))


def test_the_hpa_scales_on_a_series_the_service_exports():
    adapter = yaml.safe_load(find(render("gpu"), "ConfigMap", "cxrgen-prometheus-adapter-rules")["data"]["config.yaml"])
    served = {}
    for rule in adapter["rules"]:
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        series = re.match(r"([a-z_]+)\{", rule["seriesQuery"]).group(1)
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = series
    service = series_of_service()
    for target in ("cpu-demo", "gpu"):
        hpa = find(render(target), "HorizontalPodAutoscaler", "cxrgen")
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == "cxrgen"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        name = metric["pods"]["metric"]["name"]
        assert served[name] in service, f"the HPA's {name} is not a series of service/metrics.py"
    assert served["cxrgen_queue_depth"] == "cxrgen_queue_depth" and service["cxrgen_queue_depth"] == "Gauge"


def augment_request(docs) -> dict[str, str]:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cxrgen-augment-request"))
    return cm["data"]


def test_the_indexed_job_runs_one_real_shard_per_completion_index():
    from training.augment import LOCAL_MAX_COUNT, AugmentSpec, parse_shard, shard_range
    from training.cli import build_parser

    from service.command import request_body

    docs = render("bulk-augment")
    job = find(docs, "Job", "cxrgen-augment")
    spec, req = job["spec"], augment_request(docs)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == int(req["SHARDS"])
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    shard = container(job, "shard")
    index_env = next(e for e in shard["env"] if e["name"] == "SHARD")
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # The pod's command line, with Kubernetes' $(VAR) expansion, parsed by the real CLI, for the first and last shard.
    ranges = []
    for index in (0, spec["completions"] - 1):
        values = {**req, "SHARD": str(index)}
        argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in shard["command"][1:] + shard["args"]]
        args = build_parser().parse_args(argv)
        assert args.local and args.device == "cuda"
        i, n = parse_shard(args.shard)
        assert (i, n) == (index, spec["completions"])
        spec_ = AugmentSpec(**request_body(args)).validate(LOCAL_MAX_COUNT)
        ranges.append(shard_range(spec_.count, i, n))
        assert args.out == f"/output/{req['REQUEST']}/part-{index}"
    assert ranges[0].start == 0 and ranges[-1].stop == int(req["COUNT"]) == 1_000_000
    merge = find(docs, "Job", "cxrgen-augment-merge")
    assert gpus(container(merge, "merge")) is None


def test_shell_command_lines_parse_with_the_real_cli():
    """The scripts' cxrgen command lines (variables filled from the pods' environment) parse with the real CLI."""
    from training.cli import build_parser

    parser = build_parser()
    scripts = K8S / "base" / "scripts"
    cron = container(find(render("gpu"), "CronJob", "cxrgen-alignment-round"), "round")
    values = {**env(cron), "CXRGEN_STORE": "postgresql+psycopg://u@db/cxrgen", "out": "/runs/loop", "k": "3",
              "dest": "/models/generators/round-3", "CXRGEN_MODEL": "/models/generators/default",
              "dir": "/output/r", "parts": "/output/r/part-0 /output/r/part-1"}
    lines = 0
    for script in [*scripts.glob("*.sh"), K8S / "bulk-augment" / "merge-when-done.sh"]:
        text = re.sub(r"\\\n\s*", " ", script.read_text())  # join continued lines
        for line in text.splitlines():
            line = line.strip()
            m = re.search(r"(?:^|exec |until )(cxrgen .*?)(?:\s*>/dev/null.*|;.*)?$", line)
            if not m:
                continue
            filled = re.sub(r"\$\{?(\w+)\}?", lambda v: values[v.group(1)], m.group(1))
            args = parser.parse_args(shlex.split(filled)[1:])
            assert args.func, line
            lines += 1
            if args.command == "loop":
                assert args.promote_to == "/models/generators/round-3" and args.method == cron_env(cron, "LOOP_METHOD")
    assert lines == 3  # store stats (initContainer), loop (CronJob), augment --merge


def cron_env(c: dict, name: str) -> str:
    return env(c)[name]


@pytest.mark.parametrize("script", sorted(p.name for p in (K8S / "base" / "scripts").glob("*.sh")) +
                         ["merge-when-done.sh"])
def test_scripts_are_valid_shell(script):
    path = next(K8S.rglob(script))
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0


def test_seed_models_copies_once_and_keeps_what_is_there(tmp_path):
    bento = tmp_path / "bento"
    for sub in ("default", "rewards"):
        (bento / "src" / "models" / sub).mkdir(parents=True)
        (bento / "src" / "models" / sub / "model_index.json").write_text(sub)
    run_env = {**os.environ, "BENTO_PATH": str(bento), "MODELS_DIR": str(tmp_path / "models")}
    script = K8S / "base" / "scripts" / "seed-models.sh"
    first = subprocess.run(["sh", str(script)], env=run_env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "models" / "generators" / "default" / "model_index.json").read_text() == "default"
    (tmp_path / "models" / "rewards" / "model_index.json").write_text("operator's own")
    again = subprocess.run(["sh", str(script)], env=run_env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("kept") == 2
    assert (tmp_path / "models" / "rewards" / "model_index.json").read_text() == "operator's own"
    assert not list((tmp_path / "models").rglob(".*.tmp"))


def test_wait_for_dependencies_waits_for_the_migrated_schema_and_the_model(tmp_path):
    """The initContainer's script with the real `cxrgen store`: an empty store keeps it waiting (it gives up at
    its deadline with the reason), a migrated store and a present checkpoint let the server start."""
    cxrgen = Path(sys.executable).parent / "cxrgen"
    if not cxrgen.exists():
        pytest.skip("the cxrgen command is not installed in this environment (pip install -e .)")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    run_env = {**os.environ, "PATH": f"{cxrgen.parent}:{os.environ['PATH']}", "CXRGEN_STORE": url,
               "CXRGEN_MODEL": str(model), "WAIT_TIMEOUT_S": "0"}
    script = K8S / "base" / "scripts" / "wait-for-dependencies.sh"
    (tmp_path / "store.db").write_bytes(b"")  # a database without the schema
    waiting = subprocess.run(["sh", str(script)], env=run_env, capture_output=True, text=True, timeout=120)
    assert waiting.returncode == 1 and "gave up" in waiting.stderr and "cxrgen store upgrade" in waiting.stderr
    up = subprocess.run([str(cxrgen), "store", "upgrade", "--store", url], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stderr
    ready = subprocess.run(["sh", str(script)], env=run_env, capture_output=True, text=True, timeout=120)
    assert ready.returncode == 0 and "checkpoint" in ready.stdout, ready.stderr
    gone = subprocess.run(["sh", str(script)], env={**run_env, "CXRGEN_MODEL": str(tmp_path / "nope")},
                          capture_output=True, text=True, timeout=120)
    assert gone.returncode == 1 and "no checkpoint" in gone.stderr


# ----------------------------------------------------------------------------- alerts and dashboard


def test_alerts_and_dashboard_use_real_series():
    names = exposed_names()
    rules = yaml.safe_load((MONITORING / "alerts.rules.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for needed in ("CxrgenHighErrorRate", "CxrgenHighLatencyP95", "CxrgenGpuMemoryHigh", "CxrgenQueueGrowing",
                   "CxrgenNoFeedback"):
        assert needed in alerts
    for a in alerts.values():
        used = metric_names(a["expr"])
        assert used and used <= names, f"{a['alert']}: unknown series {sorted(used - names)}"
    dash = json.loads((MONITORING / "cxrgen-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert 'namespace="$namespace"' in t["expr"]
            used |= metric_names(t["expr"])
    assert used <= names, sorted(used - names)
    assert {n for n in series_of_service()} <= {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}  # all plotted
    cm = find(render("gpu"), "ConfigMap", "cxrgen-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["cxrgen-dashboard.json"]) == dash


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus); "
                                             ".ci/run installs it")
def test_promtool_checks_and_unit_tests_the_alert_rules():
    check = subprocess.run([PROMTOOL, "check", "rules", "alerts.rules.yml"], cwd=MONITORING, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", "alerts.test.yml"], cwd=MONITORING, capture_output=True,
                          text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr
