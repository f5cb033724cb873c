"""The infra/ manifests, compose file and launcher config: they parse, run the project image,
use only commands and options the CLI has, and hold no credentials."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.infra import commands

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
THIRD_PARTY_IMAGES = {"minio/minio", "minio/mc", "postgres"}  # the local stack's object store, its client, MLflow's database
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL|API_KEY)", re.I)
ENV_REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")  # ${VAR}, ${VAR:?why}

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _uses_a_cluster(path: Path) -> bool:
    """RayJobs with a clusterSelector run on that RayCluster's image and name none themselves."""
    return all(d.get("kind") == "RayJob" and "clusterSelector" in d["spec"] for d in _docs(path))


def _walk(node, key=None):
    """Yield (key, value) for every scalar in a YAML tree (list items carry their parent's key)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _documented_tags() -> set[str]:
    """The image tags the Dockerfile's header documents (`docker build -t TAG`)."""
    return set(re.findall(r"docker build -t (\S+)", (ROOT / "Dockerfile").read_text()))


def _k8s(kind: str) -> list[dict]:
    return [d for p in YAML_FILES if p.parent.name == "k8s" for d in _docs(p) if d.get("kind") == kind]


@pytest.mark.timeout(60)
def test_the_expected_files_exist_and_parse():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {"k8s/raycluster.yaml", "k8s/rayjob-train.yaml", "k8s/rayjob-tune.yaml",
            "k8s/rayjob-sample.yaml", "local/compose.yaml", "aws/cluster.yaml"} <= names
    for path in YAML_FILES:
        assert _docs(path), f"{path} is empty"
    assert (INFRA / "README.md").is_file()


@pytest.mark.timeout(60)
def test_the_dockerfile_documents_the_versioned_image():
    tags = _documented_tags()
    assert f"{commands.PROGRAM}:{VERSION}" in tags
    assert all(t.startswith(f"{commands.PROGRAM}:{VERSION}") for t in tags), tags


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [p for p in YAML_FILES if p.name != "kustomization.yaml" and not _uses_a_cluster(p)], ids=lambda p: p.relative_to(INFRA).as_posix())
def test_manifests_run_the_project_image(path):
    images = {v for d in _docs(path) for k, v in _walk(d) if k == "image" and isinstance(v, str)}
    ours = {i for i in images if commands.IMAGE_REF.match(i)}
    assert ours, f"{path} does not use the project image"
    assert ours <= _documented_tags(), f"{path}: {ours - _documented_tags()} not built by the Dockerfile's docs"
    others = {i.rsplit(":", 1)[0] for i in images - ours}
    assert others <= THIRD_PARTY_IMAGES, f"{path}: unexpected images {others}"


@pytest.mark.timeout(60)
def test_kustomization_renames_the_project_image():
    (kust,) = _docs(INFRA / "k8s" / "kustomization.yaml")
    assert [i["name"] for i in kust["images"]] == [commands.PROGRAM]
    for resource in kust["resources"]:
        assert (INFRA / "k8s" / resource).is_file()


def _command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in YAML_FILES:
        for doc in _docs(path):
            found += [(path.relative_to(ROOT).as_posix(), argv) for argv in commands.in_yaml(doc)]
    for path in [INFRA / "README.md", ROOT / "Dockerfile"]:
        text = path.read_text()
        if path.suffix != ".md":  # the Dockerfile's usage block: its comment lines indented by 3
            text = "```\n" + "\n".join(l[4:] for l in text.splitlines() if l.startswith("#   ")) + "\n```"
        found += [(path.relative_to(ROOT).as_posix(), argv) for argv in commands.in_markdown(text)]
    return found


COMMAND_LINES = _command_lines()


@pytest.mark.timeout(60)
def test_command_lines_are_found_where_expected():
    where = {w for w, _ in COMMAND_LINES}
    for name in ["infra/k8s/rayjob-train.yaml", "infra/k8s/rayjob-tune.yaml", "infra/k8s/rayjob-sample.yaml",
                 "infra/local/compose.yaml", "infra/README.md"]:
        assert name in where, f"no ddpm-pipe command found in {name}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where,argv", COMMAND_LINES, ids=[f"{w}:{' '.join(a[:2])}" for w, a in COMMAND_LINES])
def test_command_lines_use_the_cli_vocabulary(where, argv):
    assert commands.check(argv) == [], f"{where}: ddpm-pipe {' '.join(argv)}"


@pytest.mark.timeout(60)
def test_the_checker_rejects_what_the_cli_does_not_have():
    assert commands.check(["train", "--nodes", "4", "--gpus-per-node", "1"]) == []
    assert commands.check(["config", "show", "--config", "digits"]) == []
    assert commands.check(["--debug", "data", "--help"]) == []
    assert "unknown option --node" in commands.check(["train", "--node", "4"])[0]
    assert "unknown command 'fit'" in commands.check(["fit"])[0]
    assert "unknown command 'list'" in commands.check(["config", "list"])[0]
    assert "missing required --model" in commands.check(["sample", "--num", "4"])[0]
    assert "unexpected argument 'extra'" in commands.check(["train", "--json", "extra"])[0]
    assert list(commands.split_line('ddpm-pipe data prepare --out "$D/x" && ddpm-pipe train --json')) == [
        ["data", "prepare", "--out", "$D/x"], ["train", "--json"]]
    assert list(commands.split_line("kubectl exec h -- sh -c 'ddpm-pipe tune --trials 2'")) == [
        ["tune", "--trials", "2"]]
    assert list(commands.split_line("docker run --rm -e X=1 r.io/ddpm-pipe:0.1.0 sample --help")) == [
        ["sample", "--help"]]


def _job(name: str) -> dict:
    (job,) = [j for j in _k8s("RayJob") if j["metadata"]["name"] == name]
    return job


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,command,required", [
    ("ddpm-pipe-train", "train", ["--nodes", "4", "--gpus-per-node", "1"]),
    ("ddpm-pipe-tune", "tune", ["--trials", "32"]),
    ("ddpm-pipe-sample", "sample", ["--nodes", "4", "--gpus-per-node", "1"]),
])
def test_rayjobs_run_the_asked_commands_on_the_gpu_cluster(name, command, required):
    job = _job(name)
    (argv,) = list(commands.in_yaml(job["spec"]["entrypoint"]))
    assert argv[0] == command
    joined = " ".join(argv)
    for i in range(0, len(required), 2):
        assert f"{required[i]} {required[i + 1]}" in joined
    (cluster,) = _k8s("RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    if "--nodes" in argv:
        nodes, gpus = int(argv[argv.index("--nodes") + 1]), int(argv[argv.index("--gpus-per-node") + 1])
        fits = [g for g in cluster["spec"]["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]
                if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= gpus and g["maxReplicas"] >= nodes]
        assert fits, f"{name} asks for {nodes} nodes x {gpus} GPUs; no worker group can hold it"


@pytest.mark.timeout(60)
def test_ray_pods_take_their_settings_from_a_secret_and_run_as_non_root():
    (cluster,) = _k8s("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert {"secretRef": {"name": "ddpm-pipe-env"}} in container["envFrom"]
            assert "env" not in container or all("valueFrom" in e for e in container["env"]
                                                  if SECRET_KEY.search(e["name"]))
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", YAML_FILES + [INFRA / "local" / "env.example"],
                         ids=lambda p: p.relative_to(INFRA).as_posix())
def test_no_credential_literals(path):
    text = path.read_text()
    assert not re.search(r"\bA(KIA|SIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a URL with a password in it"
    if path.suffix == ".example":
        pairs = [l.split("=", 1) for l in text.splitlines() if "=" in l and not l.startswith("#")]
        assert all(v.strip() == "" for _, v in pairs), "env.example must leave the values empty"
        return
    for doc in _docs(path):
        for key, value in _walk(doc):  # variables (POSTGRES_PASSWORD: ...), not fields (secretName: ...)
            if isinstance(key, str) and key.isupper() and SECRET_KEY.search(key) and value not in (None, ""):
                assert isinstance(value, str) and ENV_REFERENCE.match(value), f"{key}: literal value"
        for entry in _env_entries(doc):  # k8s env lists: {name: SECRET_NAME, value: ...}
            if SECRET_KEY.search(entry["name"]) and "valueFrom" not in entry:
                pytest.fail(f"{path}: {entry['name']} set as a literal env entry; use a secretKeyRef or secretRef")


def _env_entries(node) -> list[dict]:
    """Every k8s env entry (``{name: ..., value: ...}`` or ``{name: ..., valueFrom: ...}``) in a YAML tree."""
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    if not isinstance(node, dict):
        return []
    own = [node] if isinstance(node.get("name"), str) and ({"value", "valueFrom"} & set(node)) else []
    return own + [e for v in node.values() for e in _env_entries(v)]


@pytest.mark.timeout(60)
def test_local_stack_has_tracking_storage_and_ray():
    (compose,) = _docs(INFRA / "local" / "compose.yaml")
    services = compose["services"]
    assert {"minio", "mlflow", "ray-head", "ray-worker"} <= set(services)
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg://mlflow@postgres:5432/mlflow"
    assert "mlflow:/home/ddpm/.ddpm" in services["mlflow"]["volumes"]  # the artifacts on the named volume
    env = services["ray-head"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert services["ray-worker"]["entrypoint"][:2] == ["ray", "start"]
    assert "--address=ray-head:6379" in services["ray-worker"]["entrypoint"]


@pytest.mark.timeout(60)
def test_cluster_launcher_config():
    (cfg,) = _docs(INFRA / "aws" / "cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for t in types.values()) >= 4 <= cfg["max_workers"]
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.timeout(60)
def test_local_stack_publishes_ports_on_loopback_only_and_mlflow_runs_as_non_root():
    (compose,) = _docs(INFRA / "local" / "compose.yaml")
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert {"mlflow", "ray-head", "minio"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    mlflow = compose["services"]["mlflow"]
    assert str(mlflow["user"]) not in ("0", "root")
    (volume,) = mlflow["volumes"]
    assert volume.split(":")[1] == "/home/ddpm/.ddpm"  # the image's DDPM_HOME, owned by that user
    assert all(a.split("=", 1)[1].startswith("/home/ddpm/.ddpm/")
               for a in mlflow["command"] if a.startswith("--artifacts-destination"))


@pytest.mark.timeout(60)
def test_local_stack_services_are_healthchecked_and_wait_for_what_they_need():
    (compose,) = _docs(INFRA / "local" / "compose.yaml")
    services = compose["services"]
    one_shot = {"minio-setup", "submit"}
    for name, svc in services.items():
        if name not in one_shot:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for need, how in (svc.get("depends_on") or {}).items():
            assert isinstance(how, dict), f"{name} depends on {need} without a condition"
            want = "service_completed_successfully" if need in one_shot else "service_healthy"
            assert how["condition"] == want, (name, need, how)
    assert set(services["ray-head"]["depends_on"]) == {"mlflow", "minio-setup"}  # the bucket exists first
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}
    for name, svc in services.items():  # pinned: no floating tags
        image = svc["image"]
        assert not image.endswith(":latest") and ":" in image, f"{name}: {image}"


@pytest.mark.timeout(60)
def test_local_stack_pipeline_uses_its_own_minio_key_not_the_root_key():
    (compose,) = _docs(INFRA / "local" / "compose.yaml")
    services = compose["services"]
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert "MINIO_ROOT" not in env["AWS_ACCESS_KEY_ID"] + env["AWS_SECRET_ACCESS_KEY"], name
        assert env["AWS_ACCESS_KEY_ID"].startswith("${DDPM_S3_ACCESS_KEY")
    roots = {name for name, svc in services.items() if "MINIO_ROOT_PASSWORD" in str(svc.get("environment", {}))}
    assert roots == {"minio", "minio-setup"}
    script = services["minio-setup"]["entrypoint"][-1]
    for step in ("mc mb --ignore-existing local/ddpm", "mc admin policy create local ddpm-rw",
                 'mc admin user add local "$$DDPM_S3_ACCESS_KEY"', "mc admin policy attach local ddpm-rw"):
        assert step in script, step
    assert '"arn:aws:s3:::ddpm/*"' in script and "arn:aws:s3:::*" not in script  # the bucket only


@pytest.mark.timeout(60)
def test_ray_pods_drop_privileges_and_use_the_default_seccomp_profile():
    (cluster,) = _k8s("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    sc = cluster["spec"]["autoscalerOptions"]["securityContext"]  # the autoscaler sidecar too
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


@pytest.mark.timeout(60)
def test_gpu_workers_scale_between_min_and_max_replicas():
    (cluster,) = _k8s("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] < group["maxReplicas"], "nothing to scale"


@pytest.mark.timeout(60)
def test_the_head_takes_traffic_only_from_its_cluster_the_operator_and_its_namespace():
    policies = {p["metadata"]["name"]: p for p in _k8s("NetworkPolicy")}
    policy = policies["ddpm-pipe-head"]
    (cluster,) = _k8s("RayCluster")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                                            "ray.io/node-type": "head"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    open_ports = [r for r in rules if "ports" not in r]
    assert open_ports == [{"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "ddpm-pipe"}}}]}]
    for rule in rules:
        for peer in rule["from"]:
            if "namespaceSelector" in peer:  # another namespace: the KubeRay operator's pods, in its own only
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
    ports = {p["port"] for r in rules for p in r.get("ports", [])}
    assert ports <= {6379, 8265, 10001}


@pytest.mark.timeout(60)
def test_rayjobs_have_a_deadline():
    jobs = _k8s("RayJob")
    assert len(jobs) == 3
    for job in jobs:
        assert 0 < job["spec"]["activeDeadlineSeconds"] <= 7 * 86400, job["metadata"]["name"]


@pytest.mark.timeout(60)
def test_aws_nodes_declare_their_instance_profiles():
    (launcher,) = _docs(INFRA / "aws" / "cluster.yaml")
    for name, node in launcher["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name} has no instance profile"


@pytest.mark.timeout(60)
def test_the_rayservice_serves_the_champion_with_the_serve_commands_options():
    """Issue 27: the RayService deploys what `ddpm-pipe serve` deploys (its builder, its options), the
    token from a secret, on the versions of Ray the RayCluster runs."""
    from pipelines.serve.deployment import ServeOptions

    (service,) = _k8s("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "pipelines.serve.deployment:from_args"
    assert set(app["args"]) - {"token_env"} <= set(ServeOptions.__dataclass_fields__)
    assert app["args"]["model"].endswith("@champion") and app["args"]["token_env"]
    (cluster,) = _k8s("RayCluster")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == cluster["spec"]["rayVersion"]
    for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"],
                  *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert {"secretRef": {"name": "ddpm-pipe-env"}} in container["envFrom"]


@pytest.mark.timeout(60)
def test_ray_token_authentication_is_on_wherever_ray_runs():
    """Issue 25, item 11: Ray's token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) on every Ray
    node, driver and client of the local stack, and in every KubeRay cluster; the token comes from
    .env or a Secret, never from a file here. The compose client that submits jobs holds the token
    and nothing else of the cluster's (as tests/infra/test_scaled_out.py's submitter)."""
    (compose,) = _docs(INFRA / "local" / "compose.yaml")
    services = compose["services"]
    for name in ("ray-head", "ray-worker", "serve", "submit"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    assert set(services["submit"]["environment"]) == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    clusters = [*_k8s("RayCluster"), *(s["spec"]["rayClusterConfig"] for s in _k8s("RayService"))]
    for cluster in clusters:
        spec = cluster.get("spec", cluster)
        assert spec["authOptions"] == {"mode": "token", "secretName": "ddpm-pipe-ray-token"}


@pytest.mark.timeout(60)
def test_workers_and_job_submitters_have_no_service_account_token_and_drop_privileges():
    """Issue 25, item 11: the pods that never call the Kubernetes API mount no service account token
    (the head keeps its: the autoscaler sidecar scales through the API); each RayJob's submitter pod
    runs the project image non-root, without privileges, holding the Ray token from its Secret."""
    groups = [g for c in _k8s("RayCluster") for g in c["spec"]["workerGroupSpecs"]]
    groups += [g for s in _k8s("RayService") for g in s["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False, group["groupName"]
    for job in _k8s("RayJob"):
        pod = job["spec"]["submitterPodTemplate"]["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        assert container["image"] in _documented_tags()
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ddpm-pipe-ray-token"


@pytest.mark.timeout(60)
def test_the_workers_take_traffic_only_from_their_cluster():
    """Issue 25, item 11: a NetworkPolicy covers the worker pods too: only the cluster's own pods reach them."""
    policies = {p["metadata"]["name"]: p for p in _k8s("NetworkPolicy")}
    (cluster,) = _k8s("RayCluster")
    name = cluster["metadata"]["name"]
    workers = policies["ddpm-pipe-workers"]["spec"]
    assert workers["podSelector"]["matchLabels"] == {"ray.io/cluster": name, "ray.io/node-type": "worker"}
    assert workers["policyTypes"] == ["Ingress"]
    assert workers["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": name}}}]}]
