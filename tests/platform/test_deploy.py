"""`moray deploy`: KubeRay manifests rendered from moray's configs, checked against the KubeRay CRDs
and Kubernetes' own schemas, printed with --dry-run, and applied with server-side apply. No API
server runs here: rendering and validation run for real; the apply is checked at the Kubernetes
client's HTTP boundary (urllib3's PoolManager.request), where a real cluster would answer."""

import json
import shlex
from pathlib import Path

import pytest
import urllib3
import yaml

from moray.platform import deploy
from moray.platform.cluster import RAY_ENVIRONMENT
from moray.platform.deploy import Demand, DeployError, Target, check, crd_dir, groups_for, main

ROOT = Path(__file__).resolve().parents[2]
INFRA = sorted((ROOT / "infra").glob("*.yaml"))


def _render(argv: list[str], capsys) -> list[dict]:
    assert main([argv[0], "--dry-run", *argv[1:]]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


@pytest.fixture(scope="module")
def crds():
    found = crd_dir(None)
    if found is None:
        pytest.skip("KubeRay CRDs not available (../shared/kuberay-crds)")
    return found


def test_every_infra_manifest_is_its_rendering_and_validates(crds, capsys):
    """infra/*.yaml are `make infra`'s output (the first line names the command): rendering again
    gives the same file, and every object passes the CRD and Kubernetes checks."""
    assert {p.name for p in INFRA} == {"raycluster.yaml", "rayjob-curate.yaml", "rayjob-pretrain.yaml",
                                       "rayjob-eval.yaml", "rayservice-serve.yaml", "rayservice-horizontal.yaml", "rayservice-hybrid.yaml",
                                       "rayservice-pipeline.yaml"}  # fmt: skip
    for path in INFRA:
        text = path.read_text()
        first = text.splitlines()[0]
        assert first.startswith("# rendered by: moray deploy "), path.name
        argv = shlex.split(first.removeprefix("# rendered by: moray deploy "))
        assert main(argv) == 0
        assert capsys.readouterr().out == text, f"{path.name} is stale: run `make infra`"
        checked = check(list(yaml.safe_load_all(text)), crds)
        assert any("KubeRay CRD" in c for c in checked) and any("pod templates" in c for c in checked), (
            checked
        )


def test_the_cluster_has_cpu_and_gpu_groups_autoscaling_and_token_auth(capsys):
    secret, cluster = _render(["cluster", "--cpu-workers", "1,6", "--gpu-workers", "0,3"], capsys)
    assert secret["kind"] == "Secret" and len(secret["stringData"]["auth_token"]) >= 32
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    assert spec["enableInTreeAutoscaling"] is True
    cpu, gpu = spec["workerGroupSpecs"]
    assert (cpu["minReplicas"], cpu["maxReplicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 6, 0, 3)
    # Ray's resources are the container's: what the autoscaler plans with is what Kubernetes reserves
    for group in (cpu, gpu):
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert group["rayStartParams"]["num-cpus"] == container["resources"]["requests"]["cpu"]
    # every Ray process runs with moray's Ray settings (Serve's proxies reach replicas over gRPC),
    # and a memory-backed /dev/shm (the object store; bf16 replicas' gradient mean)
    for group in (spec["headGroupSpec"], cpu, gpu):
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env.items() >= RAY_ENVIRONMENT.items() and env["RAY_SERVE_PROXY_USE_GRPC"] == "1"
        shm = [m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert [v["emptyDir"] for v in pod["volumes"] if v["name"] in shm] == [{"medium": "Memory"}]
    assert (
        gpu["rayStartParams"]["num-gpus"]
        == gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert (
        spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    )  # drivers only: jobs' resources are workers'
    # a fresh token each rendering: never one baked into a file
    again, _ = _render(["cluster"], capsys)
    assert again["stringData"]["auth_token"] != secret["stringData"]["auth_token"]


def test_jobs_run_the_ray_job_submit_entrypoint_on_a_cluster_sized_to_them(capsys):
    (_, job) = _render(["pretrain", "--set", "scaling.num_workers=[2,6]", "scaling.cpus_per_worker=1.5",
                        "--storage", "s3://bucket/runs"], capsys)  # fmt: skip
    assert job["spec"]["entrypoint"] == ("python -m moray.jobs.pretrain --config configs/pretrain/tiny.yaml --set "
                                         "'scaling.num_workers=[2,6]' scaling.cpus_per_worker=1.5 "
                                         "run.storage_path=s3://bucket/runs")  # fmt: skip
    # 6 workers x 1.5 CPUs + Ray Data's read tasks (0.25) = 9.25 CPUs: three 4-CPU pods
    (cpu,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (3, 3) and job["spec"]["shutdownAfterJobFinishes"]
    # on an existing cluster: a selector, no cluster and no Secret of its own
    (job,) = _render(["curate", "--cluster", "moray"], capsys)
    assert (
        job["spec"]["clusterSelector"] == {"ray.io/cluster": "moray"} and "rayClusterSpec" not in job["spec"]
    )
    assert job["spec"]["entrypoint"] == "python -m moray.jobs.curate --config configs/curate/default.yaml"
    (_, job) = _render(
        ["eval", "--", "--model", "models:/m@champion", "--tasks", "mmlu", "--workers", "3"], capsys
    )
    assert (
        job["spec"]["entrypoint"]
        == "python -m moray.jobs.eval --model models:/m@champion --tasks mmlu --workers 3"
    )


def test_gpu_demand_goes_to_gpu_pods():
    t = Target()
    assert groups_for(t, Demand(cpus=4.25, gpus=4)) == (
        (0, 1),
        (4, 4),
    )  # 4 GPU pods of 8 CPUs hold the CPUs too
    assert groups_for(t, Demand(cpus=12)) == ((3, 3), (0, 0))
    assert groups_for(t, Demand(cpus=0)) == ((0, 1), (0, 0))


def test_the_rayservice_serves_the_config_with_workers_for_its_replicas(capsys, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "configs" / "serve" / "moray.yaml").read_text())
    config["applications"][0]["deployments"][0].update(autoscaling_config={"min_replicas": 1, "max_replicas": 6},
                                                         ray_actor_options={"num_cpus": 2})  # fmt: skip
    config["applications"][0]["deployments"][0].pop("num_replicas")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    (_, service) = _render(["serve", "--config", str(path), "--model", "models:/m@champion"], capsys)
    serve = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "moray.jobs.serve.app:build_app" and app.args["model"] == "models:/m@champion"
    assert app.args["engine"] == config["applications"][0]["args"]["engine"]
    assert serve.http_options.host == "0.0.0.0" and serve.proxy_location == "EveryNode"
    (cpu,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert cpu["minReplicas"] == 3  # 6 replicas x 2 CPUs on 4-CPU pods


def test_the_horizontal_rayservice_autoscales_replicas_and_counts_the_expert_shards(capsys):
    from ray.serve.schema import ServeDeploySchema

    (_, service) = _render(["serve", "--model", "models:/m/1", "--mode", "horizontal"], capsys)
    serve = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve.applications
    assert app.args["mode"] == "horizontal" and app.args["expert_shards"] == {"num_shards": 2, "cpus": 1.0}
    (server,) = app.deployments
    assert server.autoscaling_config["max_replicas"] == 4 and "num_replicas" not in server.model_fields_set
    (cpu,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert cpu["minReplicas"] == 2  # 4 replicas x 1 CPU + 2 shards x 1 CPU on 4-CPU pods
    assert main(["serve", "--dry-run", "--set", "applications=[{name: m, import_path: moray.jobs.serve.app:build_app, "
                 "route_prefix: /, args: {model: m, mode: diagonal}}]"]) == 2  # fmt: skip
    assert "mode='diagonal': one of vertical, horizontal" in capsys.readouterr().err


def test_the_pipeline_rayservice_counts_each_replicas_stages(capsys):
    from ray.serve.schema import ServeDeploySchema

    (_, service) = _render(["serve", "--model", "models:/m/1", "--mode", "pipeline"], capsys)
    serve = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve.applications
    assert app.args["mode"] == "pipeline" and app.args["pipeline"] == {"num_stages": 2, "cpus": 1.0}
    assert "expert_shards" not in app.args
    (server,) = app.deployments
    assert server.autoscaling_config["max_replicas"] == 4
    (cpu,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert cpu["minReplicas"] == 3  # 4 replicas x (1 CPU + 2 stages x 1 CPU) on 4-CPU pods


def test_bad_input_is_refused_before_anything_is_applied(crds, capsys):
    assert main(["pretrain", "--set", "train.max_steps=0", "--dry-run"]) == 2
    assert "max_steps=0" in capsys.readouterr().err
    assert main(["serve", "--config", "nope.yaml", "--dry-run"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["eval", "--dry-run", "--", "--model", "m", "--tasks", "mmlu", "--k", "x"]) == 2
    with pytest.raises(SystemExit):
        main(["cluster", "--cpu-workers", "5,2"])
    with pytest.raises(SystemExit):
        main(["cluster", "--dry"])  # no abbreviations
    # a manifest that breaks the CRD or Kubernetes' schema names the field
    cluster = deploy.render_cluster(Target())
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = "two"
    with pytest.raises(
        DeployError, match=r"RayCluster moray: spec.workerGroupSpecs.0.minReplicas: 'two' is not of type"
    ):
        check([cluster], crds)
    cluster = deploy.render_cluster(Target())
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    with pytest.raises(DeployError, match="imagePullPolicy"):
        check([cluster], crds)


class _Response:
    """What urllib3 hands the Kubernetes client back."""

    def __init__(self, status: int, body: dict):
        self.status, self.reason = status, "OK" if status < 400 else "Conflict"
        self.data = json.dumps(body).encode()
        self.headers = urllib3.HTTPHeaderDict({"Content-Type": "application/json"})


@pytest.fixture
def kubeconfig(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
    }))  # fmt: skip
    return str(path)


def test_apply_at_the_kubernetes_clients_http_boundary(kubeconfig, monkeypatch, capsys):
    """Server-side apply: PATCH with application/apply-patch+yaml, fieldManager=moray and force; the
    auth Secret is created, and an existing one (409) is kept, not overwritten."""
    sent = []

    def request(self, method, url, body=None, headers=None, **kw):
        sent.append((method, url, headers.get("Content-Type"), json.loads(body) if body else None))
        if method == "POST" and len([s for s in sent if s[0] == "POST"]) == 2:
            return _Response(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
        return _Response(200 if method == "PATCH" else 201, json.loads(body))

    monkeypatch.setattr(urllib3.PoolManager, "request", request)
    assert main(["cluster", "--kubeconfig", kubeconfig]) == 0
    assert capsys.readouterr().out.splitlines() == ["secret/moray-ray-auth created",
                                                    "raycluster.ray.io/moray applied (server-side)"]  # fmt: skip
    (post, patch) = sent
    assert post[:2] == ("POST", "https://127.0.0.1:6443/api/v1/namespaces/default/secrets?fieldManager=moray")
    assert post[3]["kind"] == "Secret"
    method, url, content_type, body = patch
    assert method == "PATCH" and content_type == "application/apply-patch+yaml"
    assert (
        url
        == "https://127.0.0.1:6443/apis/ray.io/v1/namespaces/default/rayclusters/moray?fieldManager=moray&force=true"
    )
    assert body == deploy.render_cluster(Target())
    assert main(["cluster", "--kubeconfig", kubeconfig]) == 0  # again: the Secret exists and is kept
    assert "secret/moray-ray-auth kept (it exists)" in capsys.readouterr().out


def test_no_cluster_is_a_clear_error(kubeconfig, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["cluster"]) == 2
    assert "no Kubernetes cluster configured" in capsys.readouterr().err

    def refused(self, *a, **kw):
        raise urllib3.exceptions.MaxRetryError(None, "https://127.0.0.1:6443", "connection refused")

    monkeypatch.setattr(urllib3.PoolManager, "request", refused)
    assert main(["cluster", "--kubeconfig", kubeconfig]) == 2
    assert "no Kubernetes cluster reachable at https://127.0.0.1:6443" in capsys.readouterr().err
