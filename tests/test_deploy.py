"""The deployment files (deploy/) are consistent with the code: they parse, every `kolors-api`
command in them is accepted by the real CLI parser, the API image stays free of the GPU stack,
the worker image installs torch before the project, and the Kubernetes and KEDA objects point
at each other and at the real endpoints and metrics.

No Docker engine or cluster is needed: these are static checks.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolors_api.cli import parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

#: What KEDA scales on: the API's queue figures (its /metrics, Prometheus text); a trigger must
#: name exactly these, or it scales on a metric nobody exports.
QUEUE_METRICS = {"kolors_jobs_processing", "kolors_queue_depth"}

NAMESPACE = "kolors-api"
K8S_FILES = ["namespace.yaml", "redis.yaml", "api.yaml", "worker.yaml", "keda-scaledobject.yaml", "minio.yaml"]
#: The optional secret that puts images on S3/MinIO (KOLORS_API_BLOB_URL and AWS_*), and the bucket
#: the bundled MinIO (compose profile `minio`, k8s/minio.yaml) creates.
S3_SECRET = "kolors-api-s3"
BUCKET = "kolors-images"


# --------------------------------------------------------------------------- helpers


def load_all(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for name in K8S_FILES for doc in load_all(K8S / name)]


def find(kind: str, name: str | None = None, file: str | None = None) -> list[dict[str, Any]]:
    objs = load_all(K8S / file) if file else k8s_objects()
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(kind: str, name: str | None = None, file: str | None = None) -> dict[str, Any]:
    found = find(kind, name, file)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {file or 'k8s/'}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    docs = load_all(DEPLOY / "docker-compose.yml")
    assert len(docs) == 1
    return docs[0]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and line continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (DEPLOY / name).read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{name}: dangling line continuation"
    return out


def dockerfile_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, rest in dockerfile(name):
        if instr == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"{name}: use ENV KEY=value, got {item!r}"
                env[key] = value
    return env


def dockerfile_cmd(name: str) -> list[str]:
    cmds = [rest for instr, rest in dockerfile(name) if instr == "CMD"]
    assert len(cmds) == 1, f"{name}: expected one CMD"
    argv = json.loads(cmds[0])  # exec form only: signals must reach kolors-api, not a shell
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def parse_cli(argv: list[str], where: str) -> Any:
    """Parse a `kolors-api ...` argv with the real parser; fail the test on any unknown flag."""
    assert Path(argv[0]).name == "kolors-api", f"{where}: {argv} does not run kolors-api"
    try:
        return parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: the kolors-api CLI rejects {argv} (exit {exc.code})")


def k8s_argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def k8s_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def all_cli_invocations() -> list[tuple[str, list[str]]]:
    """Every argv in deploy/ that runs kolors-api, with where it comes from."""
    found: list[tuple[str, list[str]]] = []
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        found.append((f"{name} CMD", dockerfile_cmd(name)))
    for svc_name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if cmd is None:
            continue
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        if argv and Path(argv[0]).name == "kolors-api":
            found.append((f"compose {svc_name}", argv))
    for obj in k8s_objects():
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            argv = k8s_argv(c)
            if argv and Path(argv[0]).name == "kolors-api":
                found.append((f"k8s {obj['kind']}/{obj['metadata']['name']}/{c['name']}", argv))
    return found


# --------------------------------------------------------------------------- YAML and compose


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert names == {"docker-compose.yml", *(f"k8s/{n}" for n in K8S_FILES)}
    for path in files:
        load_all(path)


def test_compose_has_redis_two_api_replicas_and_one_gpu_worker() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "api-1", "api-2", "worker", "minio", "minio-bucket"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = redis["command"]
    cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert "ports" not in redis, "Redis must not be published on the host"

    host_ports = {}
    for name in ("api-1", "api-2"):
        api = services[name]
        assert api["build"]["dockerfile"] == "deploy/Dockerfile.api"
        (port,) = api["ports"]
        host_ports[name] = port.rsplit(":", 2)[-2:]
        env = compose_env(api)
        assert env["KOLORS_API_BOOTSTRAP_KEY"].startswith("${KOLORS_API_BOOTSTRAP_KEY")
        assert env["KOLORS_API_STORE"].startswith("redis://redis:6379")
        assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert host_ports == {"api-1": ["8001", "8000"], "api-2": ["8002", "8000"]}

    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1
    env = compose_env(worker)
    assert env["KOLORS_API_STORE"].startswith("redis://redis:6379")
    assert env["HF_HOME"] == "/models"
    assert "hf-cache:/models" in worker["volumes"]
    assert "hf-cache" in compose()["volumes"]
    assert "KOLORS_API_BOOTSTRAP_KEY" not in env, "the worker has no use for the admin key"


def _seconds(value: str | int) -> int:
    if isinstance(value, int):
        return value
    total = 0
    for amount, unit in re.findall(r"(\d+)(h|ms|m|s)", value):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 0}[unit]
    return total


def test_compose_gives_the_worker_time_to_drain() -> None:
    services = compose()["services"]
    assert _seconds(services["worker"]["stop_grace_period"]) >= 120
    for name in ("api-1", "api-2"):
        assert _seconds(services[name]["stop_grace_period"]) >= 120  # uvicorn's graceful shutdown


# --------------------------------------------------------------------------- the real CLI


def test_the_cli_check_itself_catches_a_wrong_flag() -> None:
    with pytest.raises(pytest.fail.Exception):
        parse_cli(["kolors-api", "serve", "--workers", "2"], "self-check")
    with pytest.raises(pytest.fail.Exception):
        parse_cli(["kolors-api", "worker", "--no-worker"], "self-check")


def test_every_kolors_api_command_is_accepted_by_the_real_cli() -> None:
    invocations = all_cli_invocations()
    wheres = [w for w, _ in invocations]
    # the two CMDs, api-1, api-2, worker, and the two Kubernetes Deployments
    assert len(invocations) == 7, wheres
    for where, argv in invocations:
        parse_cli(argv, where)


def test_api_commands_serve_without_a_worker_and_worker_commands_use_the_gpu() -> None:
    roles = {"serve": 0, "worker": 0}
    for where, argv in all_cli_invocations():
        args = parse_cli(argv, where)
        roles[args.cmd] += 1
        if args.cmd == "serve":
            assert args.no_worker, f"{where}: a fleet API replica must not run an in-process worker"
            assert args.host == "0.0.0.0", where
            assert args.port == 8000, where
        else:
            assert args.cmd == "worker", where
            assert args.model == "Kwai-Kolors/Kolors-diffusers", where
            assert args.device == "cuda:0", where
    assert roles == {"serve": 4, "worker": 3}


def _store(args: Any, env: dict[str, Any]) -> str:
    # a --store flag wins over KOLORS_API_STORE, as in Settings(**flags)
    return str(args.store or env.get("KOLORS_API_STORE") or "sqlite")


def test_every_fleet_process_uses_redis() -> None:
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        args = parse_cli(dockerfile_cmd(name), name)
        assert _store(args, dockerfile_env(name)) == "redis://redis:6379/0", name
    for svc_name in ("api-1", "api-2", "worker"):
        svc = compose()["services"][svc_name]
        args = parse_cli(list(svc["command"]), svc_name)
        assert _store(args, compose_env(svc)) == "redis://redis:6379/0", svc_name
    for dep_name in ("kolors-api", "kolors-worker"):
        (c,) = one("Deployment", dep_name)["spec"]["template"]["spec"]["containers"]
        args = parse_cli(k8s_argv(c), dep_name)
        assert _store(args, k8s_env(c)) == "redis://redis:6379/0", dep_name


# --------------------------------------------------------------------------- Dockerfiles


def test_api_image_never_installs_torch() -> None:
    text = (DEPLOY / "Dockerfile.api").read_text()
    assert "torch" not in text.lower()
    steps = dockerfile("Dockerfile.api")
    assert steps[0] == ("FROM", "python:3.11-slim")
    installs = [rest for instr, rest in steps if instr == "RUN" and "pip install" in rest]
    assert any('".[server,redis,s3]"' in r for r in installs), installs
    # every extra that any pip install of the image asks for
    groups = [g for r in installs for g in re.findall(r"\.\[([^\]]*)\]", r)]
    extras = {e.strip() for g in groups for e in g.split(",")}
    assert extras == {"server", "redis", "s3"}, f"Dockerfile.api installs extras {sorted(extras)}"


def test_api_image_runs_as_a_user_exposes_8000_and_checks_healthz() -> None:
    steps = dockerfile("Dockerfile.api")
    users = [rest for instr, rest in steps if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8000") in steps
    (health,) = [rest for instr, rest in steps if instr == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "/healthz" in argv[2] and ":8000/" in argv[2]
    assert "curl" not in health


def test_worker_image_installs_pinned_cuda_torch_before_the_project() -> None:
    steps = dockerfile("Dockerfile.worker")
    (base,) = [rest for instr, rest in steps if instr == "FROM"]
    args = dict(rest.split("=", 1) for instr, rest in steps if instr == "ARG" and "=" in rest)
    base = args.get(base.strip("${}"), base)
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")), base
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "pin torch to one version"
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")

    runs = [rest for instr, rest in steps if instr == "RUN"]
    torch_at = [i for i, r in enumerate(runs) if re.search(r'pip install "torch==\$\{TORCH_VERSION\}"', r)]
    project_at = [i for i, r in enumerate(runs) if '".[worker,redis,s3]"' in r]
    assert len(torch_at) == 1 and len(project_at) == 1, runs
    assert torch_at[0] < project_at[0], "torch must be installed before the project"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_at[0]]
    assert "torch.version.cuda" in runs[torch_at[0]], "fail the build on a CPU-only torch"

    env = dockerfile_env("Dockerfile.worker")
    assert env["HF_HOME"] == "/models"
    assert ("VOLUME", '["/models"]') in steps
    users = [rest for instr, rest in steps if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_objects_have_the_expected_kinds() -> None:
    kinds = {name: sorted(o["kind"] for o in load_all(K8S / name)) for name in K8S_FILES}
    assert kinds == {
        "namespace.yaml": ["Namespace"],
        "redis.yaml": ["NetworkPolicy", "Service", "Service", "StatefulSet"],
        "api.yaml": ["Deployment", "PodDisruptionBudget", "Service"],
        "worker.yaml": ["Deployment", "PersistentVolumeClaim"],
        "keda-scaledobject.yaml": ["ScaledObject"],
        "minio.yaml": ["Job", "NetworkPolicy", "Service", "StatefulSet"],
    }
    assert one("Namespace")["metadata"]["name"] == NAMESPACE
    for obj in k8s_objects():
        assert obj["apiVersion"] and obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), f"{workload['metadata']['name']}: selector misses its pods"
    return labels


def _container_ports(workload: dict[str, Any]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for c in workload["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            ports[p.get("name", str(p["containerPort"]))] = p["containerPort"]
    return ports


def test_services_select_their_pods_and_ports() -> None:
    for svc_name, workload in (("kolors-api", one("Deployment", "kolors-api")),
                               ("redis", one("StatefulSet", "redis")),
                               ("redis-headless", one("StatefulSet", "redis"))):
        svc = one("Service", svc_name)
        labels = _pod_labels(workload)
        assert svc["spec"]["selector"].items() <= labels.items(), svc_name
        ports = _container_ports(workload)
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in ports or target in ports.values(), f"{svc_name}: no container port {target}"
    assert one("StatefulSet", "redis")["spec"]["serviceName"] == "redis-headless"
    assert one("Service", "redis-headless")["spec"]["clusterIP"] == "None"
    assert one("Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_redis_statefulset_keeps_an_append_only_file_on_a_volume() -> None:
    sts = one("StatefulSet", "redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("redis:7")
    argv = k8s_argv(c)
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == argv[argv.index("--dir") + 1] == "/data"
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    policy = one("NetworkPolicy", "redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= _pod_labels(sts).items()


def test_api_deployment_probes_and_secret() -> None:
    dep = one("Deployment", "kolors-api", "api.yaml")
    assert dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ports = _container_ports(dep)
    assert ports == {"http": 8000}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ports or get["port"] in ports.values(), probe
    ref = k8s_env(c)["KOLORS_API_BOOTSTRAP_KEY"]["secretKeyRef"]
    assert ref == {"name": "kolors-api", "key": "bootstrap-key"}
    assert "nvidia.com/gpu" not in str(c.get("resources", {}))
    assert "worker" not in c["image"]


def test_worker_deployment_has_one_gpu_and_a_long_grace_period() -> None:
    dep = one("Deployment", "kolors-worker", "worker.yaml")
    spec = dep["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 120
    (c,) = spec["containers"]
    assert "worker" in c["image"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert k8s_env(c)["HF_HOME"] == "/models"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    models = volumes[mounts["/models"]]
    claim = models["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim, "worker.yaml")
    assert "replicas" not in dep["spec"], "KEDA owns the worker count"


def test_keda_scales_the_worker_deployment_on_the_apis_queue_metrics() -> None:
    so = one("ScaledObject", file="keda-scaledobject.yaml")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    worker = one("Deployment", "kolors-worker")
    target = so["spec"]["scaleTargetRef"]
    assert target["name"] == worker["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert so["metadata"]["namespace"] == worker["metadata"]["namespace"]
    low, high = so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
    # >= 1: the API pods' readiness (/readyz) needs a live worker (async submits would queue from zero)
    assert 1 <= low < high

    triggers = so["spec"]["triggers"]
    assert triggers and all(t["type"] == "metrics-api" for t in triggers)
    api_svc = one("Service", "kolors-api")
    (port,) = api_svc["spec"]["ports"]
    host = f"{api_svc['metadata']['name']}.{NAMESPACE}.svc"
    for t in triggers:
        meta = t["metadata"]
        assert meta["url"] == f"http://{host}{'' if port['port'] == 80 else ':' + str(port['port'])}/metrics"
        assert meta["format"] == "prometheus"
        assert int(meta["targetValue"]) >= 1
        # KEDA reads trigger metadata as strings
        assert all(isinstance(v, str) for v in meta.values()), meta
    assert {t["metadata"]["valueLocation"] for t in triggers} == QUEUE_METRICS


def test_the_metrics_keda_reads_are_the_apis() -> None:
    from kolors_api.api.metrics import Metrics

    exported = Metrics().render().decode()  # what an API process's /metrics serves, no key needed
    for metric in QUEUE_METRICS:
        assert f"# TYPE {metric} gauge" in exported, metric
    from kolors_api.api.app import PROBES

    assert "/metrics" in PROBES


# --------------------------------------------------------------------------- README


def test_readme_names_real_metrics_and_files() -> None:
    readme = (DEPLOY / "README.md").read_text()
    from kolors_api.api.metrics import Metrics

    exported = Metrics().render().decode()  # what an API process's /metrics serves
    named = set(re.findall(r"`(kolors_[a-z_]+)`", readme))
    assert {"kolors_queue_depth", "kolors_jobs_processing", "kolors_workers_alive",
            "kolors_reclaims_total", "kolors_dead_letters_total"} <= named
    for metric in named:
        assert f"# TYPE {metric} " in exported, f"README names {metric}, which /metrics does not export"
    for path in re.findall(r"deploy/[\w./-]+\.(?:ya?ml|api|worker)", readme):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    for phrase in ("/readyz", "/healthz", "/metrics", *QUEUE_METRICS, "SIGTERM", "never lost"):
        assert phrase in readme, phrase
    # the apply order: namespace first, the ScaledObject after the Deployment it scales
    order = [readme.index(f"deploy/k8s/{n}") for n in K8S_FILES if f"deploy/k8s/{n}" in readme]
    assert len(order) == len(K8S_FILES)
    assert order[0] == min(order)
    assert readme.index("deploy/k8s/worker.yaml") < readme.index("deploy/k8s/keda-scaledobject.yaml")


# --------------------------------------------------------------------------- images on S3 / MinIO


def test_both_images_install_the_s3_extra() -> None:
    for name, extras in (("Dockerfile.api", {"server", "redis", "s3"}),
                         ("Dockerfile.worker", {"worker", "redis", "s3"})):
        installs = [rest for instr, rest in dockerfile(name) if instr == "RUN" and "pip install" in rest]
        groups = [g for r in installs for g in re.findall(r"\.\[([^\]]*)\]", r)]
        assert extras <= {e.strip() for g in groups for e in g.split(",")}, name


def test_compose_passes_the_blob_url_and_aws_settings_to_every_fleet_process() -> None:
    services = compose()["services"]
    for name in ("api-1", "api-2", "worker"):
        env = compose_env(services[name])
        # empty by default (images in Redis), or what deploy/.env says
        assert env["KOLORS_API_BLOB_URL"] == "${KOLORS_API_BLOB_URL:-}", name
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            assert env[var].startswith("${" + var), (name, var)
    from kolors_api.settings import Settings

    assert Settings(blob_url="").blobs_url() is None  # what an unset variable gives: images in Redis


def test_compose_minio_is_opt_in_private_and_makes_the_bucket_with_a_lifecycle_rule() -> None:
    services = compose()["services"]
    minio, bucket = services["minio"], services["minio-bucket"]
    for svc in (minio, bucket):
        assert svc["profiles"] == ["minio"]
        assert "ports" not in svc, "MinIO must not be published on the host"
    assert minio["environment"]["MINIO_ROOT_USER"].startswith("${AWS_ACCESS_KEY_ID")
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${AWS_SECRET_ACCESS_KEY")
    assert "minio-data:/data" in minio["volumes"] and "minio-data" in compose()["volumes"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    script = bucket["entrypoint"][-1]
    assert f"mc mb --ignore-existing local/{BUCKET}" in script
    assert f"mc ilm rule add --expire-days 1 local/{BUCKET}" in script
    readme = (DEPLOY / "README.md").read_text()
    assert f"KOLORS_API_BLOB_URL=s3://{BUCKET}/outputs" in readme and "AWS_ENDPOINT_URL_S3=http://minio:9000" in readme


def test_k8s_fleet_reads_the_optional_s3_secret_and_minio_is_consistent() -> None:
    for dep_name in ("kolors-api", "kolors-worker"):
        (c,) = one("Deployment", dep_name)["spec"]["template"]["spec"]["containers"]
        assert {"secretRef": {"name": S3_SECRET, "optional": True}} in c["envFrom"], dep_name
    sts, svc = one("StatefulSet", "minio", "minio.yaml"), one("Service", "minio", "minio.yaml")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert svc["spec"]["selector"].items() <= _pod_labels(sts).items()
    assert svc["spec"]["ports"][0]["port"] == 9000 and svc["spec"]["ports"][0]["targetPort"] in _container_ports(sts)
    assert svc["spec"]["type"] == "ClusterIP"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert refs == {"MINIO_ROOT_USER": {"name": S3_SECRET, "key": "AWS_ACCESS_KEY_ID"},
                    "MINIO_ROOT_PASSWORD": {"name": S3_SECRET, "key": "AWS_SECRET_ACCESS_KEY"}}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data"} and c["args"] == ["server", "/data"]
    (mc,) = one("Job", "minio-bucket", "minio.yaml")["spec"]["template"]["spec"]["containers"]
    assert mc["envFrom"] == [{"secretRef": {"name": S3_SECRET}}]
    script = " ".join(mc["args"])
    assert "http://minio:9000" in script and f"local/{BUCKET}" in script and "--expire-days 1" in script
    policy = one("NetworkPolicy", "minio", "minio.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= _pod_labels(sts).items()
    # the secret's example in minio.yaml names the endpoint and bucket the rest uses
    header = (K8S / "minio.yaml").read_text()
    assert f"KOLORS_API_BLOB_URL=s3://{BUCKET}/outputs" in header and "AWS_ENDPOINT_URL_S3=http://minio:9000" in header
