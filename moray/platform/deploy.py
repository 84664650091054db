"""`moray deploy ...`: KubeRay manifests rendered from moray's own configs, checked, and applied.

    moray deploy cluster  [--cpu-workers 0,8] [--gpu-workers 0,2]          a RayCluster (+ its auth Secret)
    moray deploy curate   --config configs/curate/default.yaml [--set ...]  a RayJob running `moray curate`
    moray deploy pretrain --config configs/pretrain/tiny.yaml [--set ...]   a RayJob running `moray pretrain`
    moray deploy eval     [--config-args] -- --model models:/m@champion --tasks mmlu   a RayJob running `moray eval`
    moray deploy serve    --config configs/serve/moray.yaml [--model URI]   a RayService running the Serve app

Each prints its manifests with `--dry-run`; without it they are applied to the cluster of the
kubeconfig with server-side apply (field manager `moray`). A RayJob runs the same entrypoint as
`ray job submit` (`python -m moray.jobs.<job> ...`) on the cluster named by `--cluster`, or on a
cluster of its own sized to what the job asks Ray for (its workers' CPUs and GPUs, plus Ray Data's
read tasks). Every Ray pod runs with token authentication (KubeRay's `authOptions`) from the Secret
`--auth-secret`, and its Ray resources equal its container's requests.

Before anything is applied, every object is checked: the core ones (the Secret and every pod
template) against Kubernetes' own schemas (`kubernetes-validate`), the custom resources against the
KubeRay CRDs (`--crds DIR`, default `$MORAY_KUBERAY_CRDS` or ../shared/kuberay-crds beside the
repository). A manifest that fails is refused with the field that is wrong.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moray.platform.cluster import RAY_ENVIRONMENT

RAY_VERSION = "2.60.0"
KUBERNETES_VERSION = "1.33"  # the schemas core objects are checked against
FIELD_MANAGER = "moray"
REPO = Path(__file__).resolve().parents[2]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}  # fmt: skip
PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
SHARED_MOUNT = "/shared"
METRICS_PORT = 8080  # Ray's metrics export port on every pod (dashboards/prometheus.yml)


class DeployError(ValueError):
    """A manifest that cannot be rendered or fails its schema; the message names the field."""


# ------------------------------------------------------------------------------------------ sizing
@dataclass
class PodShape:
    cpus: int
    memory: str
    gpus: int = 0


@dataclass
class Target:
    """Where and how the Ray pods run (the flags common to every kind)."""

    name: str = "moray"
    namespace: str = "default"
    image: str = "moray:latest"
    mlflow_uri: str = "http://mlflow:5000"
    auth_secret: str = "moray-ray-auth"
    # a PersistentVolumeClaim mounted at /shared on every Ray pod: the image's /app/../shared, so the
    # configs' ../shared/data paths (corpus, evaluation sets) resolve there as they do beside this repo
    data_pvc: str | None = None
    head: PodShape = field(default_factory=lambda: PodShape(2, "8Gi"))
    cpu_pod: PodShape = field(default_factory=lambda: PodShape(4, "16Gi"))
    gpu_pod: PodShape = field(default_factory=lambda: PodShape(8, "64Gi", gpus=1))
    cpu_workers: tuple[int, int] = (0, 8)
    gpu_workers: tuple[int, int] = (0, 2)


@dataclass
class Demand:
    """What a job asks Ray for, beyond the head (which runs the driver and no tasks)."""

    cpus: float
    gpus: int = 0


def groups_for(target: Target, demand: Demand) -> tuple[tuple[int, int], tuple[int, int]]:
    """(min, max) replicas of the CPU and GPU worker groups that hold `demand`: GPU pods for the
    GPUs (their CPUs count too), CPU pods for the rest."""
    gpu_pods = math.ceil(demand.gpus / target.gpu_pod.gpus) if demand.gpus else 0
    rest = max(0.0, demand.cpus - gpu_pods * target.gpu_pod.cpus)
    cpu_pods = math.ceil(rest / target.cpu_pod.cpus - 1e-9)
    return (cpu_pods, max(cpu_pods, 1)), (gpu_pods, gpu_pods)


# -------------------------------------------------------------------------------------- rendering
def _serialize(obj) -> dict:
    from kubernetes import client

    return client.ApiClient().sanitize_for_serialization(obj)


def _pod_template(target: Target, role: str, shape: PodShape) -> dict:
    """A Ray pod: the image, MLflow and storage settings and moray's RAY_ENVIRONMENT in its
    environment, requests equal to limits (Ray reads its resources from them), the ports Ray and
    Serve listen on, and a memory-backed /dev/shm (a container's is 64 MB): Ray's object store
    lives there, and so do the gradients of bf16 replicas that share a pod (buffer_mean.py) and
    their one copy of the weights and optimizer state (moray/jobs/pretrain/shared_update.py)."""
    from kubernetes import client

    env = [client.V1EnvVar(name="MLFLOW_TRACKING_URI", value=target.mlflow_uri)]
    env += [client.V1EnvVar(name=k, value=v) for k, v in RAY_ENVIRONMENT.items()]
    resources = {"cpu": str(shape.cpus), "memory": shape.memory}
    if shape.gpus:
        resources["nvidia.com/gpu"] = str(shape.gpus)
    ports = [client.V1ContainerPort(container_port=METRICS_PORT, name="metrics")]
    if role == "head":
        ports += [client.V1ContainerPort(container_port=p, name=n)
                  for p, n in ((6379, "gcs"), (8265, "dashboard"), (8000, "serve"))]  # fmt: skip
    mounts = [client.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    volumes = [client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory"))]
    if target.data_pvc:
        mounts.append(client.V1VolumeMount(name="shared", mount_path=SHARED_MOUNT))
        claim = client.V1PersistentVolumeClaimVolumeSource(claim_name=target.data_pvc)
        volumes.append(client.V1Volume(name="shared", persistent_volume_claim=claim))
    container = client.V1Container(
        name=f"ray-{role}", image=target.image, env=env, ports=ports, volume_mounts=mounts,
        resources=client.V1ResourceRequirements(requests=resources, limits=dict(resources)),
    )  # fmt: skip
    return _serialize(
        client.V1PodTemplateSpec(spec=client.V1PodSpec(containers=[container], volumes=volumes))
    )


def _worker_group(target: Target, name: str, shape: PodShape, replicas: tuple[int, int]) -> dict:
    params = {"num-cpus": str(shape.cpus), "metrics-export-port": str(METRICS_PORT)}
    if shape.gpus:
        params["num-gpus"] = str(shape.gpus)
    return {"groupName": name, "replicas": replicas[0], "minReplicas": replicas[0], "maxReplicas": replicas[1],
            "rayStartParams": params, "template": _pod_template(target, "worker", shape)}  # fmt: skip


def cluster_spec(target: Target, cpu_workers: tuple[int, int], gpu_workers: tuple[int, int]) -> dict:
    """A RayCluster's spec: a head that schedules no tasks, a CPU and a GPU worker group (a group
    with max 0 is left out), Ray's in-tree autoscaler between each group's min and max, token
    authentication from the Secret."""
    groups = []
    if cpu_workers[1]:
        groups.append(_worker_group(target, "cpu", target.cpu_pod, cpu_workers))
    if gpu_workers[1]:
        groups.append(_worker_group(target, "gpu", target.gpu_pod, gpu_workers))
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 120},
        "authOptions": {"mode": "token", "secretName": target.auth_secret},
        "headGroupSpec": {
            # the head runs drivers, the GCS and the dashboard: no tasks, so a job's resources are the workers'
            "rayStartParams": {
                "num-cpus": "0",
                "dashboard-host": "0.0.0.0",
                "metrics-export-port": str(METRICS_PORT),
            },
            "template": _pod_template(target, "head", target.head),
        },
        "workerGroupSpecs": groups,
    }


def _metadata(target: Target, name: str, component: str) -> dict:
    return {"name": name, "namespace": target.namespace,
            "labels": {"app.kubernetes.io/name": "moray", "app.kubernetes.io/component": component}}  # fmt: skip


def auth_secret(target: Target, token: str) -> dict:
    """The Secret KubeRay reads the Ray token from (data key `auth_token`)."""
    from kubernetes import client

    meta = client.V1ObjectMeta(**{k: v for k, v in _metadata(target, target.auth_secret, "auth").items()})
    return _serialize(client.V1Secret(api_version="v1", kind="Secret", metadata=meta, type="Opaque",
                                      string_data={"auth_token": token}))  # fmt: skip


def render_cluster(target: Target) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(target, target.name, "cluster"),
            "spec": cluster_spec(target, target.cpu_workers, target.gpu_workers)}  # fmt: skip


def render_job(target: Target, job: str, entrypoint: list[str], demand: Demand, cluster: str | None) -> dict:
    """A RayJob running `python -m moray.jobs.<job> ARGS` (what `ray job submit` runs): on the
    RayCluster `cluster`, or on its own cluster sized to `demand` and deleted when the job ends."""
    spec: dict = {"entrypoint": shlex.join(["python", "-m", f"moray.jobs.{job}", *entrypoint]),
                  "submissionMode": "K8sJobMode", "backoffLimit": 0}  # fmt: skip
    if cluster:
        spec["clusterSelector"] = {"ray.io/cluster": cluster}
    else:
        cpu, gpu = groups_for(target, demand)
        spec.update(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600,
                    rayClusterSpec=cluster_spec(target, (cpu[0], cpu[0]), gpu))  # fmt: skip
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(target, f"{target.name}-{job}", job),
            "spec": spec}  # fmt: skip


def render_service(target: Target, serve_config: dict) -> dict:
    """A RayService running the Serve config: the HTTP proxy on every node and on the pod's
    interface (reached through the RayService's serve Service: keep it cluster-internal, or set
    api_keys), workers sized to the deployments' replicas (their autoscaling maximum)."""
    config = dict(serve_config)
    config["proxy_location"] = "EveryNode"
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0"}
    demand = serve_demand(config)
    cpu, gpu = groups_for(target, demand)
    body = yaml.safe_dump(config, sort_keys=False)
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _metadata(target, f"{target.name}-serve", "serve"),
            "spec": {"serveConfigV2": body, "rayClusterConfig": cluster_spec(target, cpu, gpu)}}  # fmt: skip


MORAY_APP = "moray.jobs.serve.app:build_app"


def _set_mode(app: dict, mode: str) -> None:
    """A moray application in `mode`: horizontal autoscales its replicas (1 to 4 on ongoing requests)
    over the expert shards its args ask for (2 by default); pipeline autoscales replicas that each
    bring their own stages (2 by default); hybrid has two replica deployments, Vertical and
    Horizontal, each autoscaling on the requests its side gets."""
    if app.get("import_path") != MORAY_APP:
        return
    app.setdefault("args", {})["mode"] = mode
    if mode == "vertical":
        return
    if mode == "pipeline":
        app["args"].setdefault("pipeline", {"num_stages": 2, "cpus": 1.0})
    else:
        app["args"].setdefault("expert_shards", {"num_shards": 2, "cpus": 1.0})
    scaled = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}
    deployments = []
    for d in app.get("deployments", []):
        if d.get("name") != "MorayServer":
            deployments.append(d)
            continue
        options = {k: v for k, v in d.items() if k not in ("name", "num_replicas")}
        names = ("Vertical", "Horizontal") if mode == "hybrid" else ("MorayServer",)
        deployments += [{"name": name, **options, **scaled} for name in names]
    app["deployments"] = deployments


def _check_serve_args(config: dict) -> None:
    """Each moray application's args parse as ServeSettings (a bad mode or field is refused here)."""
    from moray.jobs.serve.app import ServeSettings
    from moray.platform.config import from_dict

    for app in config.get("applications", []):
        if app.get("import_path") == MORAY_APP:
            from_dict(ServeSettings, dict(app.get("args", {})), f"applications[{app.get('name')}].args")


def serve_demand(config: dict) -> Demand:
    """CPUs and GPUs of every deployment at its largest replica count, of horizontal applications'
    expert shards and of pipeline replicas' stages."""
    cpus, gpus = 0.0, 0
    for app in config.get("applications", []):
        args = app.get("args") or {} if app.get("import_path") == MORAY_APP else {}
        if args.get("mode") in ("horizontal", "hybrid"):
            shards = args.get("expert_shards") or {}
            cpus += shards.get("num_shards", 2) * shards.get("cpus", 1.0)
        stages = args.get("pipeline") or {}
        per_replica = (
            stages.get("num_stages", 2) * stages.get("cpus", 1.0) if args.get("mode") == "pipeline" else 0
        )
        for d in app.get("deployments", []):
            options = d.get("ray_actor_options", {})
            replicas = d.get("autoscaling_config", {}).get("max_replicas") or d.get("num_replicas", 1)
            cpus += replicas * (options.get("num_cpus", 1) + per_replica)
            gpus += replicas * math.ceil(options.get("num_gpus", 0))
    return Demand(cpus, gpus)


# ------------------------------------------------------------------------------------------ checks
def crd_dir(explicit: str | None) -> Path | None:
    for candidate in (
        explicit,
        os.environ.get("MORAY_KUBERAY_CRDS"),
        REPO.parent / "shared" / "kuberay-crds",
    ):
        if candidate and Path(candidate, CRD_FILES["RayCluster"]).is_file():
            return Path(candidate)
    if explicit:
        raise DeployError(f"--crds {explicit}: no {CRD_FILES['RayCluster']} there")
    return None


def _path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def check(manifests: list[dict], crds: Path | None) -> list[str]:
    """Raise DeployError unless every object validates; return what was checked against what."""
    import jsonschema
    import kubernetes_validate

    checked = []
    for m in manifests:
        kind, name = m["kind"], m["metadata"]["name"]
        if kind in CRD_FILES:
            if crds is not None:
                try:
                    _crd_validator(crds / CRD_FILES[kind], m["apiVersion"].split("/")[1]).validate(m)
                except jsonschema.ValidationError as e:
                    raise DeployError(f"{kind} {name}: {_path(e)}: {e.message}") from None
                checked.append(f"{kind} {name}: the KubeRay CRD ({crds / CRD_FILES[kind]})")
            templates = list(_pod_templates(m))
            for where, template in templates:
                wrapped = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": name},
                    "template": template,
                }
                _k8s_validate(kubernetes_validate, wrapped, f"{kind} {name} {where}")
            if templates:
                checked.append(
                    f"{kind} {name}: {len(templates)} pod templates against Kubernetes {KUBERNETES_VERSION}"
                )
        else:
            _k8s_validate(kubernetes_validate, m, f"{kind} {name}")
            checked.append(f"{kind} {name}: Kubernetes {KUBERNETES_VERSION}")
    return checked


@functools.cache
def _crd_validator(path: Path, version: str):
    """The JSON-schema validator of one CRD version (the C YAML loader: these files are about 1 MB; the
    schema itself is trusted, so not meta-validated again at each check)."""
    import jsonschema

    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = found["schema"]["openAPIV3Schema"]
    return jsonschema.validators.validator_for(schema)(schema)


def _k8s_validate(kv, obj: dict, what: str) -> None:
    try:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as e:
        raise DeployError(f"{what}: {_path(e)}: {e.message}") from None


def _pod_templates(m: dict):
    spec = m["spec"]
    cluster = (
        spec.get("rayClusterSpec")
        or spec.get("rayClusterConfig")
        or (spec if m["kind"] == "RayCluster" else None)
    )
    if cluster is None:
        return
    yield "head", cluster["headGroupSpec"]["template"]
    for g in cluster.get("workerGroupSpecs", []):
        yield f"worker group {g['groupName']}", g["template"]


# ------------------------------------------------------------------------------------------- apply
def apply(manifests: list[dict], kubeconfig: str | None) -> list[str]:
    """Server-side apply of every object (the Secret only created: an existing token is kept).
    Raises DeployError when no cluster is configured or reachable."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(config_file=kubeconfig)
    except (ConfigException, FileNotFoundError, TypeError) as e:
        raise DeployError(
            f"no Kubernetes cluster configured ({e}); use --dry-run to print the manifests"
        ) from None
    api = client.ApiClient()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    done = []
    try:
        for m in manifests:
            kind, name, ns = m["kind"], m["metadata"]["name"], m["metadata"]["namespace"]
            if kind == "Secret":
                try:
                    core.create_namespaced_secret(ns, m, field_manager=FIELD_MANAGER)
                    done.append(f"secret/{name} created")
                except ApiException as e:
                    if e.status != 409:
                        raise
                    done.append(f"secret/{name} kept (it exists)")
                continue
            group, version = m["apiVersion"].split("/")
            custom.patch_namespaced_custom_object(
                group, version, ns, PLURALS[kind], name, m, field_manager=FIELD_MANAGER, force=True,
                _content_type="application/apply-patch+yaml",
            )  # fmt: skip
            done.append(f"{kind.lower()}.{group}/{name} applied (server-side)")
    except ApiException as e:
        raise DeployError(f"the API server refused {kind} {name}: {e.status} {e.reason}: {e.body}") from None
    except Exception as e:  # urllib3's MaxRetryError, connection refused, DNS: no cluster reachable
        if "urllib3" in type(e).__module__ or isinstance(e, OSError):
            raise DeployError(
                f"no Kubernetes cluster reachable at {api.configuration.host} ({type(e).__name__})"
            ) from None
        raise
    return done


# --------------------------------------------------------------------------------------- commands
def _pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN,MAX") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= MIN <= MAX")
    return lo, hi


def _target(args) -> Target:
    t = Target(name=args.name, namespace=args.namespace, image=args.image, mlflow_uri=args.mlflow_uri,
               auth_secret=args.auth_secret, data_pvc=args.data_pvc)  # fmt: skip
    t.cpu_pod = PodShape(args.cpus_per_pod, args.memory_per_pod)
    t.gpu_pod = PodShape(args.gpu_pod_cpus, args.gpu_pod_memory, gpus=args.gpus_per_pod)
    if args.kind == "cluster":
        t.cpu_workers, t.gpu_workers = args.cpu_workers, args.gpu_workers
    return t


def render(args) -> list[dict]:
    """The manifests a `moray deploy` command stands for (without the auth Secret)."""
    from moray.platform.config import ConfigError

    target = _target(args)
    try:
        if args.kind == "cluster":
            return [render_cluster(target)]
        if args.kind == "serve":
            from moray.platform.config import apply_overrides, load_yaml

            config = load_yaml(args.config)
            for app in config.get("applications", []):
                if args.model:
                    app.setdefault("args", {})["model"] = args.model
                if args.mode:
                    _set_mode(app, args.mode)
            config = apply_overrides(config, args.set)
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(config)
            _check_serve_args(config)
            return [render_service(target, config)]
        entry, demand = job_entrypoint(args)
        return [render_job(target, args.kind, entry, demand, args.cluster)]
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise DeployError(f"{args.kind}: {e}") from None


def job_entrypoint(args) -> tuple[list[str], Demand]:
    """The job's arguments (its config checked here, before anything is rendered) and what it asks
    Ray for. A config file travels by its path in the image; overrides travel as --set."""
    if args.kind == "pretrain":
        from moray.jobs.pretrain.data import READ_TASK_CPUS
        from moray.jobs.pretrain.job import load_config

        cfg = load_config(args.config, args.set)
        _, hi = cfg.scaling.worker_range
        demand = Demand(hi * cfg.scaling.cpus_per_worker + READ_TASK_CPUS, hi if cfg.scaling.use_gpu else 0)
        storage = ["run.storage_path=" + args.storage] if args.storage and not cfg.run.storage_path else []
        return _config_args(args.config, [*args.set, *storage]), demand
    if args.kind == "curate":
        from moray.jobs.curate.pipeline import load_config

        load_config(args.config, args.set)
        return _config_args(args.config, args.set), Demand(args.cpus_per_pod)
    # eval: its own flags, after --
    from moray.jobs.eval.__main__ import build_parser, config_from_args

    rest = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    config = config_from_args(build_parser().parse_args(rest))
    return rest, Demand(config.workers * config.cpus_per_worker)


def _config_args(config: str | None, overrides: list[str]) -> list[str]:
    out = ["--config", config] if config else []
    return out + (["--set", *overrides] if overrides else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moray deploy", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    kinds = parser.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--name", default="moray", help="the RayCluster's name, the prefix of the others'")
    common.add_argument("--namespace", default="default")
    common.add_argument("--image", default="moray:latest", help="built from the Dockerfile")
    common.add_argument(
        "--mlflow-uri", default="http://mlflow:5000", help="the MLflow server the jobs track to"
    )
    common.add_argument("--storage", help="shared pyarrow URI for run storage (s3://bucket/runs)")
    common.add_argument(
        "--auth-secret", default="moray-ray-auth", help="Secret holding the Ray token (auth_token)"
    )
    common.add_argument(
        "--data-pvc", help=f"a PersistentVolumeClaim mounted at {SHARED_MOUNT} (data, eval sets)"
    )
    common.add_argument("--cpus-per-pod", type=int, default=4)
    common.add_argument("--memory-per-pod", default="16Gi")
    common.add_argument("--gpus-per-pod", type=int, default=1)
    common.add_argument("--gpu-pod-cpus", type=int, default=8)
    common.add_argument("--gpu-pod-memory", default="64Gi")
    common.add_argument("--crds", help="KubeRay CRD directory to check custom resources against")
    common.add_argument("--dry-run", action="store_true", help="print the manifests; apply nothing")
    common.add_argument(
        "--no-auth-secret", action="store_true", help="leave the Secret out (it exists already)"
    )
    common.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    cluster = kinds.add_parser("cluster", parents=[common], allow_abbrev=False, help="a RayCluster")
    cluster.add_argument("--cpu-workers", type=_pair, default=(0, 8), metavar="MIN,MAX")
    cluster.add_argument("--gpu-workers", type=_pair, default=(0, 2), metavar="MIN,MAX")
    for kind, default in (
        ("curate", "configs/curate/default.yaml"),
        ("pretrain", "configs/pretrain/tiny.yaml"),
    ):
        p = kinds.add_parser(
            kind, parents=[common], allow_abbrev=False, help=f"a RayJob running moray {kind}"
        )
        p.add_argument("--config", default=default, help="a config file (the same path in the image)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
        p.add_argument("--cluster", help="run on this RayCluster (default: a cluster of the job's own)")
    ev = kinds.add_parser("eval", parents=[common], allow_abbrev=False, help="a RayJob running moray eval")
    ev.add_argument("--cluster", help="run on this RayCluster (default: a cluster of the job's own)")
    ev.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then moray eval's own flags")
    serve = kinds.add_parser("serve", parents=[common], allow_abbrev=False, help="a RayService")
    serve.add_argument("--config", default="configs/serve/moray.yaml", help="a Serve config")
    serve.add_argument("--model", help="the model every application serves (models:/NAME@champion)")
    serve.add_argument(
        "--mode", choices=["vertical", "horizontal", "pipeline", "hybrid"], default=None,
        help="every moray application's serving mode (default: the config's); horizontal adds expert shards "
        "and autoscales the replicas, pipeline gives each replica its own stages",
    )  # fmt: skip
    serve.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    return parser


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a RayService's serveConfigV2) as literal blocks, readable in the manifest."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def to_yaml(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        manifests = render(args)
        makes_cluster = not getattr(args, "cluster", None)  # a RayJob on an existing cluster makes none
        if makes_cluster and not args.no_auth_secret:
            manifests.insert(0, auth_secret(_target(args), secrets.token_urlsafe(32)))
        checked = check(manifests, crd_dir(args.crds))
        if args.dry_run:
            print(f"# rendered by: moray deploy {shlex.join(argv)}\n" + to_yaml(manifests), end="")
            for line in checked:
                print(f"# checked {line}", file=sys.stderr)
            return 0
        for line in apply(manifests, args.kubeconfig):
            print(line)
    except DeployError as e:
        print(f"moray deploy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
