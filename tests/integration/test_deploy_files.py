"""deploy/ (issue 23): the deployment files pass the real validators and agree with each other and the code.

No container runtime here: nothing is built or started. What runs: hadolint on deploy/Dockerfile,
kubernetes-validate --strict on deploy/k8s/, the Compose Specification JSON schema on deploy/compose.yaml,
`envoy --mode validate` on deploy/envoy.yaml (all pinned in .venv-deploy by `make deploy-tools`), and checks
that what one file assumes of another (names, ports, grace periods, health services, CLI flags, metric names,
a verbatim copy of deploy/envoy.yaml) holds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
TOOLS = ROOT / ".venv-deploy"
K8S_VERSION = "1.30.0"
GATEWAY_GRPC_PORT = 50051
GATEWAY_METRICS_PORT = 9464
READINESS_SERVICE = "salf.v1.Gateway"


def _tools() -> Path:
    if not (TOOLS / ".installed").exists():
        pytest.skip(f"{TOOLS.name}/.installed missing: run `make deploy-tools` (the validators, pinned)")
    return TOOLS


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=60, **kw)


def _k8s_docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _k8s(kind: str, name: str) -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s/, found {len(found)}"
    return found[0]


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _container(deployment: dict, name: str) -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def _k8s_gateway_args() -> list[str]:
    return [str(a) for a in _container(_k8s("Deployment", "salf-gateway"), "gateway")["args"]]


def _compose_gateway_args() -> list[str]:
    return [str(a) for a in _compose()["services"]["salf-gateway"]["command"]]


def _flag(args: list[str], flag: str) -> str:
    """The value of ``flag`` in an argument list (``--flag value`` or ``--flag=value``)."""
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparsed duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            ins, _, rest = cur.strip().partition(" ")
            out.append((ins.upper(), rest.strip()))
            cur = ""
    return out


# ---------------------------------------------------------------- the validators


def test_hadolint_passes_the_dockerfile():
    tools = _tools()
    r = _run(tools / "bin/hadolint", "--no-color", "deploy/Dockerfile")
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_kubernetes_validate_strict_passes_every_manifest():
    tools = _tools()
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"gateway.yaml", "prometheus-adapter.yaml", "triton.yaml", "redis.yaml",
                                       "envoy.yaml", "pvc.yaml"}
    r = _run(tools / "bin/kubernetes-validate", "--strict", "-k", K8S_VERSION, *files)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "ERROR" not in out and "WARN" not in out, out
    for f in files:  # every resource of every file was checked, none skipped
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        assert out.count(f"{f.relative_to(ROOT)} passed") == len(docs), out


def test_compose_file_matches_the_compose_specification_schema():
    tools = _tools()
    schema = tools / "compose_spec.json"
    assert schema.exists(), "make deploy-tools extracts compose/config/compose_spec.json from docker-compose 1.29.2"
    script = ("import json, sys, yaml, jsonschema\n"
              "v = jsonschema.Draft7Validator(json.load(open(sys.argv[1])))\n"
              "doc = yaml.safe_load(open(sys.argv[2]))\n"
              "print(json.dumps([[list(map(str, e.absolute_path)), e.message] for e in v.iter_errors(doc)]))\n")
    r = _run(tools / "bin/python", "-c", script, schema, DEPLOY / "compose.yaml")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [], r.stdout
    # the schema is strict (additionalProperties: false), so a misspelt key would have failed
    r = _run(tools / "bin/python", "-c", script.replace("doc = yaml.safe_load(open(sys.argv[2]))",
                                                        "doc = {'services': {'x': {'imag': 'a'}}}"),
             schema, DEPLOY / "compose.yaml")
    assert json.loads(r.stdout), "the compose schema accepted a misspelt key"


def test_envoy_validates_its_config():
    tools = _tools()
    r = _run(tools / "bin/envoy", "--mode", "validate", "-c", "deploy/envoy.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout + r.stderr


def test_envoy_images_are_the_release_that_validated():
    version = re.search(r"/(\d+\.\d+\.\d+)/", _run(_tools() / "bin/envoy", "--version").stdout).group(1)
    image = f"envoyproxy/envoy:v{version}"
    assert _compose()["services"]["envoy"]["image"] == image
    assert _container(_k8s("Deployment", "salf-envoy"), "envoy")["image"] == image


# ---------------------------------------------------------------- what the files assume of each other


def test_k8s_envoy_configmap_is_deploy_envoy_yaml_verbatim():
    cm = _k8s("ConfigMap", "salf-envoy")
    assert cm["data"]["envoy.yaml"].encode() == (DEPLOY / "envoy.yaml").read_bytes(), \
        "deploy/k8s/envoy.yaml's ConfigMap differs from deploy/envoy.yaml: copy it again"
    mounts = _container(_k8s("Deployment", "salf-envoy"), "envoy")["volumeMounts"]
    assert any(m["mountPath"] == "/etc/envoy" for m in mounts)


def test_envoy_upstream_is_the_gateway_service_name_and_port():
    envoy = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (sock["address"], sock["port_value"]) == ("salf-gateway", GATEWAY_GRPC_PORT)
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == READINESS_SERVICE
    # compose: the service of that name, several replicas; k8s: a headless Service of that name
    gw = _compose()["services"]["salf-gateway"]
    assert gw["deploy"]["replicas"] == 3 and "ports" not in gw
    svc = _k8s("Service", "salf-gateway")
    assert svc["spec"]["clusterIP"] == "None"
    assert any(p["port"] == GATEWAY_GRPC_PORT for p in svc["spec"]["ports"])
    for args in (_compose_gateway_args(), _k8s_gateway_args()):
        assert int(_flag(args, "--port")) == GATEWAY_GRPC_PORT and _flag(args, "--host") == "0.0.0.0"
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert f"{listener}:{listener}" in _compose()["services"]["envoy"]["ports"]
    assert _k8s("Service", "salf-envoy")["spec"]["ports"][0]["port"] == listener


def test_termination_grace_is_longer_than_the_gateways_drain():
    k8s_grace = float(_flag(_k8s_gateway_args(), "--grace"))
    pod = _k8s("Deployment", "salf-gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > k8s_grace
    compose_grace = float(_flag(_compose_gateway_args(), "--grace"))
    assert _seconds(_compose()["services"]["salf-gateway"]["stop_grace_period"]) > compose_grace


def test_gateway_probes_ask_the_health_services():
    c = _container(_k8s("Deployment", "salf-gateway"), "gateway")
    assert c["readinessProbe"]["grpc"] == {"port": GATEWAY_GRPC_PORT, "service": READINESS_SERVICE}
    assert c["livenessProbe"]["grpc"]["port"] == GATEWAY_GRPC_PORT
    assert c["livenessProbe"]["grpc"].get("service", "") == ""  # liveness: the overall service
    health = [a for i, a in _dockerfile_instructions() if i == "HEALTHCHECK"]
    assert len(health) == 1 and f"service='{READINESS_SERVICE}'" in health[0]
    assert f"127.0.0.1:{GATEWAY_GRPC_PORT}" in health[0] and "timeout=2" in health[0]


def test_prometheus_scrapes_every_gateway_replica_and_triton():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    (sd,) = jobs["salf-gateway"]["dns_sd_configs"]
    assert sd["names"] == ["salf-gateway"] and sd["type"] == "A" and sd["port"] == GATEWAY_METRICS_PORT
    triton_cmd = _compose()["services"]["triton"]["command"]
    triton_metrics = re.search(r"--metrics-port=(\d+)", triton_cmd).group(1)
    assert jobs["triton"]["static_configs"][0]["targets"] == [f"triton:{triton_metrics}"]
    mounts = {m["source"]: m["target"] for m in _compose()["services"]["prometheus"]["volumes"]}
    assert mounts["./prometheus/compose.yml"] == "/etc/prometheus/prometheus.yml"
    # the recording rules the dashboard's deployment-wide panels read (salf:... series)
    assert prom["rule_files"] == [mounts["./prometheus/rules.yml"]]
    recorded = set(re.findall(r"record: (\S+)", (DEPLOY / "prometheus" / "rules.yml").read_text()))
    used = set(re.findall(r"salf:[a-zA-Z0-9_:]+", (ROOT / "docs" / "grafana-dashboard.json").read_text()))
    assert used <= recorded, f"dashboard series no rule records: {sorted(used - recorded)}"
    for args in (_compose_gateway_args(), _k8s_gateway_args()):
        assert int(_flag(args, "--metrics-port")) == GATEWAY_METRICS_PORT
        assert _flag(args, "--metrics-host") == "0.0.0.0"  # the default is loopback: unscrapable
    pod = _k8s("Deployment", "salf-gateway")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(GATEWAY_METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in _container(_k8s("Deployment", "salf-gateway"), "gateway")["ports"]}
    assert ports == {"grpc": GATEWAY_GRPC_PORT, "metrics": GATEWAY_METRICS_PORT}
    expose = [a for i, a in _dockerfile_instructions() if i == "EXPOSE"]
    assert expose == [f"{GATEWAY_GRPC_PORT} {GATEWAY_METRICS_PORT}"]


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource():
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True and ds["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    (provider,) = yaml.safe_load((prov / "dashboards" / "salf.yml").read_text())["providers"]
    mounts = {m["source"]: m["target"] for m in _compose()["services"]["grafana"]["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts["../docs/grafana-dashboard.json"]).parent == Path(provider["options"]["path"])


def test_hpa_scales_on_a_metric_the_gateway_exports():
    hpa = _k8s("HorizontalPodAutoscaler", "salf-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "salf-gateway"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert re.search(rf'Gauge\(\s*"{re.escape(name)}"', (ROOT / "serving" / "metrics.py").read_text()), \
        f"{name} is not a Gauge of serving/metrics.py"
    rules = yaml.safe_load(_k8s("ConfigMap", "salf-prometheus-adapter")["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if name in r["seriesQuery"]]
    assert rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert rule["metricsQuery"].startswith("sum by (<<.GroupBy>>)")  # summed over `method`, per pod
    assert _k8s("PodDisruptionBudget", "salf-gateway")["spec"]["minAvailable"] == 2


def test_gateway_args_agree_between_compose_and_k8s():
    compose, k8s = _compose_gateway_args(), _k8s_gateway_args()
    assert _flags(compose) == _flags(k8s)
    for flag in _flags(compose):
        if flag not in ("--triton", "--cache"):  # service names differ: triton / salf-triton, redis / salf-redis
            assert _flag(compose, flag) == _flag(k8s, flag), flag
    assert _flag(compose, "--triton") == "triton:8001" and _flag(k8s, "--triton") == "salf-triton:8001"
    assert _flag(compose, "--cache") == "redis://redis:6379/0"
    assert _flag(k8s, "--cache") == "redis://salf-redis:6379/0"
    assert {p["port"] for p in _k8s("Service", "salf-triton")["spec"]["ports"]} == {8000, 8001, 8002}
    assert _k8s("Service", "salf-redis")["spec"]["ports"][0]["port"] == 6379
    # the model repository, read-only, where --model-repository says
    repo = _flag(k8s, "--model-repository")
    for dep, ctr in (("salf-gateway", "gateway"), ("salf-triton", "triton")):
        pod = _k8s("Deployment", dep)["spec"]["template"]["spec"]
        (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert vol["persistentVolumeClaim"] == {"claimName": "salf-model-repository", "readOnly": True}
        (m,) = [m for m in _container(_k8s("Deployment", dep), ctr)["volumeMounts"] if m["name"] == vol["name"]]
        assert m["mountPath"] == repo and m["readOnly"] is True
    assert _k8s("PersistentVolumeClaim", "salf-model-repository")["spec"]["accessModes"] == ["ReadOnlyMany"]
    for svc in ("salf-gateway", "triton"):
        (m,) = [m for m in _compose()["services"][svc]["volumes"] if m["target"] == "/models"]
        assert m["source"] == "../model_repository" and m["read_only"] is True


def test_the_id_key_comes_from_outside_and_no_secret_is_committed():
    env = _compose()["services"]["salf-gateway"]["environment"]
    assert env["SALF_ID_KEY"].startswith("${SALF_ID_KEY:?")
    (var,) = [e for e in _container(_k8s("Deployment", "salf-gateway"), "gateway")["env"] if e["name"] == "SALF_ID_KEY"]
    assert var["valueFrom"]["secretKeyRef"] == {"name": "salf-id-key", "key": "key"}
    assert not [d for d in _k8s_docs() if d["kind"] == "Secret"]
    assert "kubectl create secret generic salf-id-key --from-literal=key=$(openssl rand -hex 32)" in \
        (DEPLOY / "README.md").read_text()


def test_every_gateway_flag_is_an_option_of_salfctl_serve():
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    r = _run(ROOT / ".venv/bin/salfctl", "serve", "--help", env=env)
    assert r.returncode == 0, r.stderr
    known = set(re.findall(r"--[a-z0-9][a-z0-9-]*", r.stdout))
    cmd = [a for i, a in _dockerfile_instructions() if i == "CMD"]
    used = _flags(_compose_gateway_args()) + _flags(_k8s_gateway_args()) + _flags(json.loads(cmd[0]))
    assert not set(used) - known - {"--cache"}, f"not options of salfctl serve: {sorted(set(used) - known)}"
    # last: the shared Redis cache option (issue 23) that compose and k8s start the gateways with
    assert "--cache" in known, "salfctl serve has no --cache option (deploy/ passes --cache redis://...)"


def test_dockerfile_builds_like_the_makefile_and_runs_salfctl_serve():
    makefile = (ROOT / "Makefile").read_text()
    make_protoc = re.search(r"grpc_tools\.protoc (.*) \$\(PROTOS\)", makefile).group(1).split()
    runs = " ".join(a for i, a in _dockerfile_instructions() if i == "RUN")
    docker_protoc = re.search(r"grpc_tools\.protoc (.*?) proto/salf/v1/\*\.proto", runs).group(1).split()
    assert docker_protoc == make_protoc
    assert "touch salf/v1/__init__.py" in runs
    pin = re.search(r'"(grpcio-tools==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"{pin}"' in runs, f"the Dockerfile's grpcio-tools is not the dev extra's {pin}"
    ins = _dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2 and all(re.match(r"python:3\.11[\w.-]*-slim", f) for f in froms)
    assert "[serve]" in runs and "torch" not in runs
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["salfctl", "serve"]
    user = [a for i, a in ins if i == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    # the Dockerfile copies every package pyproject.toml installs
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    copied = {a.split()[0].rstrip("/") for i, a in ins if i == "COPY" and "--from" not in a}
    assert {p.strip(' "*') for p in include.split(",")} <= copied


def test_promtool_accepts_the_rules_and_the_single_host_config():
    """deploy/prometheus/rules.yml (recording rules) and docs/prometheus.yml (which loads them) parse with
    Prometheus's own checker (Debian's prometheus package ships promtool; make test installs it)."""
    import shutil

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make prometheus-bin` installs Debian's prometheus package"
    for args in (["check", "rules", str(DEPLOY / "prometheus" / "rules.yml")],
                 ["check", "config", str(ROOT / "docs" / "prometheus.yml")]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr
