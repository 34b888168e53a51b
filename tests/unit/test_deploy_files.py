"""The deploy files parse, hold the keys their tools need, and every `ep-launch` command they (and
docs/deploy.md) contain is a valid command line whose config file exists and validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ep_runtime.cli import build_parser
from ep_runtime.config import load_config, resolve_plan

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CLUSTER = DEPLOY / "ray" / "cluster.yaml"
KUBE = DEPLOY / "k8s" / "raycluster.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCS = REPO / "docs" / "deploy.md"
NVLS_OFF = ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1")


def _strings(node) -> list[str]:
    """Every string inside a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def ep_launch_commands(text: str) -> list[list[str]]:
    """`ep-launch ...` invocations in free text: from `ep-launch` to the end of the command (line
    end, `&&`, `;`, `|`, a closing quote); a `\\` line continuation joins lines."""
    text = text.replace("\\\n", " ")
    cmds = []
    for m in re.finditer(r"(?:^|[\s/`\"'])ep-launch\s+([^\n`\"]*)", text):
        rest = re.split(r"&&|;|\|", m.group(1))[0]
        args = shlex.split(rest, comments=True)
        if args and not args[0].startswith(
            ("-", "<", "/", "~")
        ):  # not a path (`ln -s .../ep-launch /usr/...`)
            cmds.append(args)
    return cmds


def markdown_code(text: str) -> str:
    """The fenced code blocks and inline code spans of a Markdown page (prose is not commands)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return "\n".join(blocks + spans)


def _config_path(arg: str) -> Path:
    """A config argument as written on a node (`~/ep-runtime/deploy/...`, `deploy/...`) -> the repo file."""
    idx = arg.find("deploy/configs/")
    assert idx >= 0, f"config {arg} is not one of deploy/configs/*.yaml"
    return REPO / arg[idx:]


def _check_command(args: list[str], where: str) -> None:
    if args[0] == "bench":
        return  # benchmark arguments belong to the benchmark scripts
    if "|" in args[0]:
        return  # a synopsis such as `bench kernels|dispatch|layer`
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `ep-launch {' '.join(args)}` is not a valid command line ({exc})")
    files = []
    if getattr(ns, "config", None):
        files.append(ns.config)
    files += [f for f in getattr(ns, "files", None) or [] if "*" not in f]
    if getattr(ns, "file", None):
        files.append(ns.file)
    for f in files:
        if f.isupper():
            continue  # a placeholder such as FILE
        path = _config_path(f)
        assert path.is_file(), f"{where}: `ep-launch {' '.join(args)}` names a missing file {path}"
        resolve_plan(load_config(path))


def test_all_deploy_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert CLUSTER in files and KUBE in files
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f


def test_ray_cluster_launcher_file():
    c = yaml.safe_load(CLUSTER.read_text())
    for key in ("cluster_name", "provider", "auth", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):  # fmt: skip
        assert key in c, f"cluster.yaml lacks {key}"
    assert c["provider"]["type"] and c["provider"].get("head_ip")
    setup = "\n".join(c["setup_commands"])
    assert "nvidia-nvshmem" in setup and ".deepep" in setup and "NVSHMEM_DIR" in setup
    assert 'pip install -q -e ".[ray,mpi]"' in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = "\n".join(c[key])
        assert "ray start" in start
        for var in (*NVLS_OFF, "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NVSHMEM_IB_ENABLE_IBGDA=1"):
            assert var in start, f"{key} does not set {var}"
        assert "RAY_AUTH_MODE" not in start, "clusters keep Ray's token authentication"
    cmds = ep_launch_commands(CLUSTER.read_text())
    assert cmds, "cluster.yaml runs no ep-launch command"
    for args in cmds:
        _check_command(args, "cluster.yaml")


def test_kuberay_cluster_and_job():
    docs = {d["kind"]: d for d in yaml.safe_load_all(KUBE.read_text())}
    assert set(docs) == {"RayCluster", "RayJob"}
    rc, job = docs["RayCluster"], docs["RayJob"]
    for d in (rc, job):
        assert d["apiVersion"] == "ray.io/v1" and d["metadata"]["name"]
    head = rc["spec"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups, "no worker group"
    gpu_group = groups[0]
    container = gpu_group["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(gpu_group["rayStartParams"]["num-gpus"]) == gpus
    env = {e["name"]: e["value"] for e in container["env"]}
    for var in NVLS_OFF:
        k, v = var.split("=")
        assert env.get(k) == v
    assert "RAY_AUTH_MODE" not in env
    # The job runs on this cluster, with a valid ep-launch command line whose file fits the pods.
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    cmds = ep_launch_commands(job["spec"]["entrypoint"])
    assert len(cmds) == 1 and cmds[0][0] == "run"
    _check_command(cmds[0], "RayJob entrypoint")
    ns = build_parser().parse_args(cmds[0])
    par = load_config(_config_path(ns.config)).parallel
    assert par.ep_size <= gpus * gpu_group["replicas"], "the job needs more GPUs than the worker group has"
    assert par.resolved_ranks_per_node <= gpus


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+devel", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    assert re.search(r"^ARG DEEPEP_SRC=", text, re.M), "DeepEP source must be a build argument"
    assert "pip install --no-build-isolation ." in text and "NVSHMEM_DIR" in text
    for m in re.finditer(r"^COPY\s+(\S+)\s+\S+$", text, re.M):
        src = m.group(1)
        if src.startswith("${"):
            continue  # the user's DeepEP source
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    assert 'CMD ["ep-launch"' in text


def test_docs_commands_are_valid():
    text = DOCS.read_text()
    for topic in (
        "--address",
        "ray job submit",
        "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME",
        "IBGDA",
        "NVSHMEM",
    ):
        assert topic in text, f"docs/deploy.md does not cover {topic}"
    cmds = ep_launch_commands(markdown_code(text))
    assert len(cmds) >= 8
    for args in cmds:
        _check_command(args, "docs/deploy.md")


def test_command_extraction():
    assert ep_launch_commands("x && .venv/bin/ep-launch run --ranks 4; echo") == [["run", "--ranks", "4"]]
    assert ep_launch_commands('entry: "ep-launch worker --config deploy/configs/a.yaml"') == [
        ["worker", "--config", "deploy/configs/a.yaml"]
    ]
    with pytest.raises(pytest.fail.Exception):
        _check_command(["run", "--bogus"], "test")
