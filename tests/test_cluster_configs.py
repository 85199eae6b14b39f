"""The cloud launch path (cluster/): every config checked against what it must agree with, and the
start scripts run for real.

- cluster/aws.yaml: Ray's own JSON schema and config validation (shipped in the installed Ray), node
  types and their resources, the setup installing exactly pyproject.toml's dependencies, token auth.
- cluster/kuberay/*.yaml: KubeRay v1 RayCluster/RayJob; every entrypoint parsed by midiforge's own
  argparse parser; images = the one cluster/Dockerfile builds (pyproject's version); Kubernetes
  quantities; GPU groups; Secrets for S3 and the Ray token.
- cluster/Dockerfile and .dockerignore: the base image, what is copied (with Docker's .dockerignore
  rules) and installed.
- cluster/start-head.sh + start-worker.sh: a head and a second node joining it, the job server
  answering with the token (and refusing without), `ray stop`, nothing left. This runs inside a
  private network + PID namespace made for the test (`unshare`): loopback is its only interface, so
  Ray cannot move onto the machine's address, and every process in it dies with the namespace.

AWS and Kubernetes themselves are not run here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
STAGES = ("preprocess", "train", "generate")

# AWS instance types the config names: vCPUs and NVIDIA GPUs (AWS's published specifications)
INSTANCE_TYPES = {"m5.2xlarge": (8, 0), "c6i.4xlarge": (16, 0), "g5.xlarge": (4, 1)}
# a Kubernetes resource quantity (the pattern of the quantity fields in Kubernetes' own OpenAPI schemas)
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}


def _requirement_key(text: str):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    r = Requirement(text)
    return canonicalize_name(r.name), tuple(sorted(r.extras)), str(r.specifier), str(r.marker or "")


def _pyproject_requirements() -> set:
    return {_requirement_key(d) for d in PYPROJECT["project"]["dependencies"]}


def _dockerfile() -> tuple[dict, list[str]]:
    """(ARG defaults, instruction lines with continuations joined) of cluster/Dockerfile."""
    text = (CLUSTER / "Dockerfile").read_text()
    lines, cur = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not cur:
            continue
        cur += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if not raw.endswith("\\"):
            if cur.strip():
                lines.append(cur.strip())
            cur = ""
    args = {}
    for line in lines:
        m = re.match(r"ARG\s+(\w+)=(\S+)$", line)
        if m:
            args[m.group(1)] = m.group(2)
    return args, lines


def _ray_version() -> str:
    return _dockerfile()[0]["RAY_VERSION"]


# -- cluster/aws.yaml -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_yaml_validates_against_rays_schema(aws):
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(aws), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    assert aws["provider"]["type"] == "aws" and aws["provider"]["region"]
    # and as `ray up` takes it: Ray's defaults filled in, setup commands merged, then Ray's own validation
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(prepare_config(json.loads(json.dumps(aws))))


def test_ray_schema_check_is_not_vacuous(aws):
    """The same validation refuses a broken copy of the config (so the test above can fail)."""
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    bad = json.loads(json.dumps(aws))
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    bad["available_node_types"]["cpu_worker"]["min_worker"] = 0
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(bad))) >= 2


def test_aws_node_types_and_resources(aws):
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    for name, t in types.items():
        res = t["resources"]
        assert set(res) <= {"CPU", "GPU", "memory", "object_store_memory"} | {k for k in res if k.startswith("custom")}, name
        assert all(isinstance(v, int) and v >= 0 for v in res.values()), (name, res)
        itype = t["node_config"]["InstanceType"]
        assert itype in INSTANCE_TYPES, f"{name}: {itype} has no known vCPU/GPU count in this test"
        vcpus, gpus = INSTANCE_TYPES[itype]
        assert res.get("CPU", vcpus) <= vcpus and res.get("GPU", gpus) <= gpus, (name, itype, res)
        if name != aws["head_node_type"]:
            assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= aws["max_workers"], name
    workers = {n: t for n, t in types.items() if n != aws["head_node_type"]}
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and all(t["min_workers"] == 0 for t in cpu), "a CPU worker type autoscaled from 0 (preprocess)"
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "a GPU worker type autoscaled from 0 (train, generate)"
    assert all(INSTANCE_TYPES[t["node_config"]["InstanceType"]][1] >= 1 for t in gpu)
    # containers: the official Ray image at the Ray the Dockerfile uses; GPU nodes on its -gpu variant
    ray_version = _ray_version()
    assert aws["docker"]["image"] == f"rayproject/ray:{ray_version}-py311"
    for t in gpu:
        assert t["docker"]["worker_image"] == f"rayproject/ray:{ray_version}-py311-gpu"


def _pip_requirements(command: str) -> tuple[set, str]:
    """The requirements a `... pip install ...` shell command names (and its MIDIFORGE_PIP_SPEC)."""
    words = shlex.split(command)
    spec = next(w.split("=", 1)[1] for w in words if w.startswith("MIDIFORGE_PIP_SPEC="))
    i = words.index("install", words.index("pip"))
    reqs = {_requirement_key(w) for w in words[i + 1:] if not w.startswith("-") and "$" not in w and w != "&&"}
    return reqs, spec


def test_aws_setup_installs_exactly_pyprojects_dependencies(aws):
    install = [c for c in aws["setup_commands"] if "pip install" in c and "MIDIFORGE_PIP_SPEC" in c]
    assert len(install) == 1, aws["setup_commands"]
    reqs, spec = _pip_requirements(install[0])
    assert reqs == _pyproject_requirements(), (
        f"aws.yaml installs {sorted(reqs)}, pyproject.toml pins {sorted(_pyproject_requirements())}")
    from packaging.requirements import Requirement

    assert Requirement(spec).name == PYPROJECT["project"]["name"]
    assert '"$MIDIFORGE_PIP_SPEC"' in install[0]
    # a node type with its own worker_setup_commands replaces setup_commands: it must install the same
    for name, t in aws["available_node_types"].items():
        if "worker_setup_commands" in t:
            assert install[0] in t["worker_setup_commands"], name
    # the image's Ray satisfies pyproject's ray requirement (pip keeps it)
    ray_req = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray")
    assert _ray_version() in ray_req.specifier


def test_aws_start_commands_use_token_auth_and_reachable_dashboard(aws):
    head = " ; ".join(aws["head_start_ray_commands"])
    worker = " ; ".join(aws["worker_start_ray_commands"])
    for cmds in (head, worker):
        start = cmds.index("ray start")
        assert re.search(r"export [^;]*RAY_AUTH_MODE=token", cmds[:start]), cmds
        assert "TF_USE_LEGACY_KERAS=1" in cmds[:start]
    host = re.search(r"--dashboard-host[= ](\S+)", head)
    assert host and host.group(1) not in ("127.0.0.1", "localhost"), "the job server must be reachable from other nodes"
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    # the token reaches every node
    assert aws["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# -- cluster/kuberay/ -------------------------------------------------------------------------------------


def _manifests() -> dict[str, dict]:
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: one object per file"
        out[path.name] = docs[0]
    return out


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _groups(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def _midiforge_parser():
    from midiforge.cli import _modules, build_parser

    return build_parser(_modules())


def _parse_entrypoint(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[0] == "midiforge", entrypoint
    parser = _midiforge_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse printed why on stderr
        raise AssertionError(f"midiforge's parser rejects the entrypoint {entrypoint!r} (exit {exc.code})") from None
    # flags spelled in full (argparse would also take an abbreviation, which a new flag can make ambiguous)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    known = {o for a in sub._actions for o in a.option_strings}
    flags = [w.split("=", 1)[0] for w in argv[2:] if w.startswith("--")]
    assert set(flags) <= known, f"{entrypoint!r}: not flags of midiforge {args.command}: {set(flags) - known}"
    return args


def test_kuberay_manifests_parse_with_the_v1_api():
    manifests = _manifests()
    kinds = sorted(d["kind"] for d in manifests.values())
    assert kinds.count("RayCluster") >= 1 and kinds.count("RayJob") == len(STAGES), kinds
    for name, doc in manifests.items():
        assert doc["apiVersion"] == "ray.io/v1", name
        assert doc["kind"] in ("RayCluster", "RayJob"), name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == _ray_version(), name
        assert spec["authOptions"] == {"mode": "token", "secretName": "midiforge-ray-token"}, name


def test_every_rayjob_entrypoint_is_a_midiforge_command_its_parser_accepts():
    stages = {}
    for name, doc in _manifests().items():
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        args = _parse_entrypoint(spec["entrypoint"])
        stages[args.command] = name
        assert args.resume, f"{name}: --resume, so a retried job continues"
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, name
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, name
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(runtime_env, dict) and runtime_env["env_vars"]["TF_USE_LEGACY_KERAS"] == "1", name
        gpu_groups = [g for g, spec_ in _groups(doc) if _gpus(spec_)]
        if args.command == "train":
            assert args.launcher == "ray" and args.num_workers >= 1, name
            workers = sum(s["replicas"] for g, s in _groups(doc) if g != "head")
            assert args.num_workers <= workers, f"{name}: {args.num_workers} TF workers on {workers} worker pods"
        if args.command == "generate" and args.num_gpus_per_worker:
            assert gpu_groups, f"{name}: --num-gpus-per-worker needs a GPU group"
        if args.command == "train":
            assert gpu_groups and args.use_gpu, f"{name}: train runs on the GPU group, one GPU per worker"
    assert set(stages) == set(STAGES), stages


def test_the_entrypoint_check_is_not_vacuous():
    with pytest.raises(AssertionError, match="rejects"):
        _parse_entrypoint("midiforge preprocess s3://b/in s3://b/out --no-such-flag")
    with pytest.raises(AssertionError, match="rejects"):
        _parse_entrypoint("midiforge generate s3://b/model s3://b/pieces")  # --num-pieces is required
    with pytest.raises(AssertionError, match="not flags"):
        _parse_entrypoint("midiforge generate s3://b/model s3://b/pieces --num-piece 4")  # an abbreviation


def _gpus(group: dict) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def test_kuberay_pods_images_resources_and_secrets():
    image_cpu, image_gpu = f"midiforge:{VERSION}", f"midiforge:{VERSION}-gpu"
    for name, doc in _manifests().items():
        for group, spec in _groups(doc):
            if group != "head":
                assert 0 <= spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"], (name, group)
            assert isinstance(spec["rayStartParams"], dict), (name, group)
            assert all(isinstance(v, str) for v in spec["rayStartParams"].values()), (name, group)
            pod = spec["template"]["spec"]
            ray_container = pod["containers"][0]
            for c in pod["containers"]:
                assert c["image"] in (image_cpu, image_gpu), f"{name} {group}: image {c['image']}"
                res = c["resources"]
                assert res.get("limits"), f"{name} {group}: limits"
                for kind in ("limits", "requests"):
                    for key, q in res.get(kind, {}).items():
                        assert isinstance(q, str) and QUANTITY.match(q), f"{name} {group}: {kind}.{key}={q!r}"
                        assert not q.startswith("-") and float(re.match(r"[+]?[0-9.]+", q).group()) > 0, (name, q)
                if "nvidia.com/gpu" in res["limits"]:
                    assert re.fullmatch(r"[1-9][0-9]*", res["limits"]["nvidia.com/gpu"]), (name, group)
                    assert res.get("requests", {}).get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == \
                        res["limits"]["nvidia.com/gpu"], f"{name} {group}: GPU requests must equal limits"
            gpu = _gpus(spec) > 0
            assert (ray_container["image"] == image_gpu) == gpu, f"{name} {group}: GPU pods on the -gpu image, others not"
            if group == "gpu":
                assert gpu, f"{name}: the GPU group requests nvidia.com/gpu"
            # S3 credentials from the Secret, the endpoint optional; nothing secret inline
            env = {e["name"]: e for e in ray_container.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "midiforge-s3" and ref["key"] == key and not ref.get("optional"), (name, group)
            ref = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "midiforge-s3" and ref["optional"] is True, (name, group)
            assert all("value" not in e for e in env.values()), f"{name} {group}: values come from Secrets"
    head_params = [_groups(d)[0][1]["rayStartParams"] for d in _manifests().values()]
    assert all(p.get("dashboard-host") not in (None, "127.0.0.1", "localhost") for p in head_params)


def test_the_quantity_check_is_not_vacuous():
    assert all(QUANTITY.match(q) for q in ("8", "500m", "16Gi", "1.5", "2e3", "128974848"))
    assert not any(QUANTITY.match(q) for q in ("16GB", "1 Gi", "two", "", "8cpu", "0.5Gb"))


# -- cluster/Dockerfile and .dockerignore -----------------------------------------------------------------


def _docker_pattern_regex(pattern: str) -> tuple[str, str | re.Pattern]:
    """Docker's .dockerignore pattern -> how it matches (moby/patternmatcher: exact, prefix, suffix, regexp)."""
    out, kind, i = "^", "exact", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            first, i = i == 0, i + 2
            if pattern[i:i + 1] == "/":
                i += 1
            if i >= len(pattern):
                kind, out = ("prefix", out) if kind == "exact" else ("regexp", out + ".*")
            else:
                out += "(.*/)?"
                kind = "regexp"
            if first:
                kind = "suffix"
            continue
        if ch == "*":
            out, kind = out + "[^/]*", "regexp"
        elif ch == "?":
            out, kind = out + "[^/]", "regexp"
        elif ch in "[]":
            out, kind = out + ch, "regexp"
        else:
            out += re.escape(ch)
        i += 1
    if kind == "regexp":
        return kind, re.compile(out + "$")
    return kind, pattern


def _docker_pattern_match(pattern: str, path: str) -> bool:
    kind, how = _docker_pattern_regex(pattern)
    if kind == "exact":
        return path == how
    if kind == "prefix":
        return path.startswith(pattern[:-2])
    if kind == "suffix":
        suffix = pattern[2:]
        return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
    return bool(how.match(path))


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """MatchesOrParentMatches of moby/patternmatcher: is ``path`` left out of the build context?"""
    matched = False
    parts = path.split("/")[:-1]
    for raw in patterns:
        exclusion = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if exclusion else raw)
        if exclusion != matched:
            continue
        match = _docker_pattern_match(pattern, path) or any(
            _docker_pattern_match(pattern, "/".join(parts[:i + 1])) for i in range(len(parts)))
        if match:
            matched = not exclusion
    return matched


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerignore_matcher_follows_dockers_rules():
    pats = ["*", "!src", "**/__pycache__", "!README.md"]
    assert _dockerignored(".venv/bin/python", pats) and _dockerignored("Makefile", pats)
    assert not _dockerignored("src/midiforge/cli.py", pats) and not _dockerignored("README.md", pats)
    assert _dockerignored("src/midiforge/music/__pycache__/x.pyc", pats)
    assert _dockerignored("demo-out/a", ["demo-out"]) and not _dockerignored("src/demo-out.py", ["demo-out"])


def test_dockerfile_builds_the_image_the_manifests_name():
    args, lines = _dockerfile()
    text = (CLUSTER / "Dockerfile").read_text()
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}"], froms
    assert args["RAY_VARIANT"] == "py311", "the default is the CPU image"
    assert "--build-arg RAY_VARIANT=py311-gpu" in text, "the GPU variant is a documented build-arg"
    from packaging.specifiers import SpecifierSet

    assert "3.11" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    # the tags it documents are the images the manifests name
    assert f"-t midiforge:{VERSION} ." in text and f"-t midiforge:{VERSION}-gpu ." in text
    envs = " ".join(ln for ln in lines if ln.startswith("ENV "))
    assert re.search(r"\bTF_USE_LEGACY_KERAS=1\b", envs)
    # it installs this repository's pyproject.toml: pyproject, setup.py, the README it names, src/
    copied = set()
    for ln in lines:
        if ln.startswith("COPY "):
            words = [w for w in ln.split()[1:] if not w.startswith("--")]
            copied.update(w.rstrip("/") for w in words[:-1])
    needed = {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"], "src"}
    assert needed <= copied, copied
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    assert any(re.search(r"\bpip install \.(\s|$)", r) for r in runs), runs
    # nothing it copies is left out of the build context by .dockerignore; caches and builds are
    patterns = _dockerignore_patterns()
    sources = [p for p in ROOT.joinpath("src").rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.suffix not in (".so", ".pyc") and ".egg-info" not in str(p)]
    assert sources
    for path in [ROOT / n for n in needed if n != "src"] + sources:
        rel = path.relative_to(ROOT).as_posix()
        assert path.exists() and not _dockerignored(rel, patterns), f"{rel} is not in the build context"
    for rel in (".venv/bin/python", "demo-out/model/run.json", ".git/HEAD", "tests/test_storage.py",
                "src/midiforge/__pycache__/cli.cpython-311.pyc", "src/midiforge/music/_events.cpython-311-x86_64-linux-gnu.so"):
        assert _dockerignored(rel, patterns), f"{rel} should stay out of the build context"


# -- cluster/start-head.sh and start-worker.sh ------------------------------------------------------------


def _script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MIDIFORGE_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    env.update(extra)
    return env


def test_start_scripts_say_clearly_when_ray_is_missing(tmp_path):
    if shutil.which("ray", path="/usr/bin:/bin"):
        pytest.skip("a system-wide ray is on /usr/bin:/bin")
    out = subprocess.run(["bash", str(CLUSTER / "start-head.sh")], capture_output=True, text=True, timeout=60,
                         env=_script_env(MIDIFORGE_VENV=str(tmp_path / "no-venv")))
    assert out.returncode == 2 and "MIDIFORGE_VENV" in out.stderr and "bin/ray" in out.stderr, out.stderr
    # a copy of the scripts with no .venv beside them and no ray on PATH
    (tmp_path / "cluster").mkdir()
    for name in ("start-head.sh", "start-worker.sh", "ray-env.sh"):
        shutil.copy(CLUSTER / name, tmp_path / "cluster" / name)
    for name in ("start-head.sh", "start-worker.sh"):
        out = subprocess.run(["bash", str(tmp_path / "cluster" / name), "127.0.0.1:1"], capture_output=True,
                             text=True, timeout=60, env=_script_env())
        assert out.returncode == 2 and "ray not found" in out.stderr and "MIDIFORGE_VENV" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_start_worker_refuses_to_start_without_the_token(tmp_path):
    out = subprocess.run(["bash", str(CLUSTER / "start-worker.sh"), "127.0.0.1:1"], capture_output=True, text=True,
                         timeout=60, env=_script_env(RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing")))
    assert out.returncode == 2 and "no Ray auth token" in out.stderr and str(tmp_path / "missing") in out.stderr


def _have_namespaces() -> str | None:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=30)
    return None if probe.returncode == 0 else f"cannot create a network+PID namespace here: {probe.stderr.strip()}"


def _leftovers(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{proc.name}: {cmd[:160]}")
    return found


@pytest.mark.timeout(900)
def test_start_head_and_worker_make_a_cluster_with_token_auth():
    """cluster/start-head.sh and start-worker.sh for real: two nodes, the job server, `ray stop`."""
    why = _have_namespaces()
    if why:
        pytest.skip(why)
    tmp = tempfile.mkdtemp(prefix="mfc-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        proc = subprocess.Popen(
            ["unshare", "--net", "--map-root-user", "--pid", "--fork", "--mount-proc",
             sys.executable, __file__, "--scenario", tmp],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=_script_env())
        try:
            out, err = proc.communicate(timeout=780)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"the cluster scenario did not finish in 780 s:\n{err[-4000:]}")
        assert proc.returncode == 0, f"scenario failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
        r = json.loads(out.strip().splitlines()[-1])
        logs = "\n".join(f"--- {k}:\n{v}" for k, v in r.get("logs", {}).items())
        # the scripts found the repository's .venv (ray was not on PATH) and printed where things are
        assert f"ray {ROOT}/.venv/bin/ray" in r["head_stderr"], logs
        assert "dashboard/job server http://127.0.0.1:8265 (bound to 127.0.0.1)" in r["head_stderr"], logs
        assert r["token_path"] in r["head_stderr"], logs
        assert re.fullmatch(r"[0-9a-f]{64}", r["token"]) and r["token_mode"] == 0o600, r
        # the dashboard/job server listens on the node's address (127.0.0.1 given), not on every interface
        assert ["127.0.0.1", 8265] in r["listening"] and ["0.0.0.0", 8265] not in r["listening"], r["listening"]
        assert r["nodes"] == 2, logs
        assert r["job_list_rc"] == 0, logs
        assert r["job_list_no_token_rc"] != 0 and "Authentication" in r["job_list_no_token_err"], logs
        assert r["job_rc"] == 0 and "alive nodes 2" in r["job_out"], logs
        # jobs run with the install the scripts found: `midiforge` resolves to the same venv
        assert f"midiforge at {ROOT}/.venv/bin/midiforge" in r["job_out"], logs
        assert r["ray_stop_rc"] == 0, logs
        assert r["left_in_namespace"] == [], r["left_in_namespace"]
        deadline = time.monotonic() + 30
        while _leftovers(tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _leftovers(tmp) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the scenario, run in the test's own network + PID namespace -----------------------------------


def _listening() -> list[list]:
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            ip_hex, port_hex = local.split(":")
            ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            out.append([ip, int(port_hex, 16)])
    return out


def _scenario(tmp: str) -> int:  # pragma: no cover - runs in the namespace, reported through JSON
    tmpd = Path(tmp)
    r: dict = {"logs": {}}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    token = tmpd / "token"
    base = _script_env(RAY_AUTH_TOKEN_PATH=str(token), HOME=str(tmpd / "home"))
    ray = str(ROOT / ".venv" / "bin" / "ray")
    client = {**base, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def run(key, cmd, env, timeout=300):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        r["logs"][key] = (p.stdout[-3000:] + "\n" + p.stderr[-3000:]).strip()
        return p

    try:
        # the head: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps it on 127.0.0.1; its dashboard host defaults
        # to the node address
        head = run("head", ["bash", str(CLUSTER / "start-head.sh"), "--node-ip-address=127.0.0.1", "--port=6379",
                            "--num-cpus=1", f"--temp-dir={tmpd / 'h'}", "--disable-usage-stats"],
                   {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=240)
        r["head_rc"], r["head_stderr"] = head.returncode, head.stderr
        r["token_path"] = str(token)
        if token.exists():
            r["token"], r["token_mode"] = token.read_text(), stat.S_IMODE(token.stat().st_mode)
        # a second node: Ray refuses to join a cluster with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so it is
        # unset here; inside this namespace loopback is the only address there is
        worker = run("worker", ["bash", str(CLUSTER / "start-worker.sh"), "127.0.0.1:6379", "--node-ip-address=127.0.0.1",
                                "--num-cpus=1", f"--temp-dir={tmpd / 'w'}", "--dashboard-agent-listen-port=52366",
                                "--disable-usage-stats"], base, timeout=240)
        r["worker_rc"] = worker.returncode
        deadline, r["nodes"] = time.monotonic() + 120, 0
        while time.monotonic() < deadline:
            st = run("status", [ray, "status", "--address", "127.0.0.1:6379"], client, timeout=120)
            active = st.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            r["nodes"] = len(re.findall(r"^\s*1 node_[0-9a-f]+", active, re.M))
            if r["nodes"] >= 2:
                break
            time.sleep(1)
        jl = run("job_list", [ray, "job", "list", "--address", "http://127.0.0.1:8265"], client, timeout=120)
        r["job_list_rc"] = jl.returncode
        r["listening"] = _listening()
        anon = {k: v for k, v in base.items() if k != "RAY_AUTH_TOKEN_PATH"}
        jl = run("job_list_no_token", [ray, "job", "list", "--address", "http://127.0.0.1:8265"], anon, timeout=120)
        r["job_list_no_token_rc"], r["job_list_no_token_err"] = jl.returncode, jl.stderr[-2000:]
        code = ("import ray, shutil; ray.init(); print('alive nodes', sum(n['Alive'] for n in ray.nodes())); "
                "print('midiforge at', shutil.which('midiforge'))")
        job = run("job", [ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--", "python", "-c", code],
                  client, timeout=300)
        r["job_rc"], r["job_out"] = job.returncode, job.stdout[-4000:]
    finally:
        # `ray stop` stops every Ray process it can see: in this PID namespace, only ours
        stop = run("ray_stop", [ray, "stop"], client, timeout=180)
        r["ray_stop_rc"] = stop.returncode
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r["left_in_namespace"] = [x for m in ("site-packages/ray", "ray::", "bin/ray ") for x in _leftovers(m)
                                      if "--scenario" not in x]
            if not r["left_in_namespace"]:
                break
            time.sleep(0.5)
        print(json.dumps(r))
    return 0


def _init(tmp: str) -> int:  # pragma: no cover
    """PID 1 of the namespace: runs the scenario in a child and reaps every process orphaned to it (Ray's
    daemons outlive the `ray start` that forked them), so that `ray stop` sees them really go."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = _scenario(tmp)
        finally:
            sys.stdout.flush()
            os._exit(code)
    while True:
        pid, status = os.wait()
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--scenario":
    sys.exit(_init(sys.argv[2]))
