"""Consistency checks for the deployment files (docker/, cluster/, .dockerignore).

Fast and offline: only pyyaml, tomllib and the standard library. Nothing is built or applied;
these tests catch drift between pyproject.toml pins, Dockerfile ARGs, image tags, manifests and
the config files they reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: requires-python allows it, tomllib is 3.11+
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
DOCKER_README = ROOT / "docker" / "README.md"
CLUSTER_DIR = ROOT / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
LAUNCHER_YAML = CLUSTER_DIR / "ray-cluster.yaml"
RAYCLUSTER_YAML = KUBERAY_DIR / "raycluster.yaml"
RAYJOB_YAML = KUBERAY_DIR / "rayjob.yaml"

IMAGE_REPO = "ghcr.io/gogepo/gogepo-ray"
IMAGE_RE = re.compile(re.escape(IMAGE_REPO) + r":([A-Za-z0-9][A-Za-z0-9_.-]*)")
# Tag suffixes (after "<version>-") that name an image variant; "" is the CPU image.
IMAGE_VARIANTS = {"", "cuda"}
CONFIG_REF_RE = re.compile(r"configs/[A-Za-z0-9_.\-/]+\.ya?ml")
# A config a README says is *not* shipped: "no `configs/x.yaml` ships".
ABSENT_REF_RE = re.compile(r"\bno `(" + CONFIG_REF_RE.pattern + r")`")
TOP_README = ROOT / "README.md"
ARG_RE = re.compile(r"^\s*ARG\s+([A-Z0-9_]+)=(\S+)\s*$", re.MULTILINE)
PIN_RE = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*(?:;.*)?$"
)


# ---------------------------------------------------------------------------------------------
# helpers


def _norm(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """Drop a PEP 440 local label: 2.13.0+cu128 -> 2.13.0."""
    return version.split("+", 1)[0]


def _vtuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", _public(version)))


def _satisfies(version: str, spec: str) -> bool:
    """Minimal PEP 440 check for simple comma-separated specifiers (no wildcards)."""
    ops = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
    }
    v = _vtuple(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.match(r"(>=|<=|==|!=|>|<)\s*([\d.]+)$", clause)
        assert m, f"unsupported specifier {clause!r}"
        want = _vtuple(m.group(2))
        n = max(len(v), len(want))
        if not ops[m.group(1)](v + (0,) * (n - len(v)), want + (0,) * (n - len(want))):
            return False
    return True


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


PYPROJECT = _pyproject()
PROJECT = PYPROJECT["project"]
PROJECT_NAME = _norm(PROJECT["name"])
PROJECT_VERSION = PROJECT["version"]


def _pins() -> dict[str, str]:
    pins = {}
    for dep in PROJECT["dependencies"]:
        m = PIN_RE.match(dep)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


PINS = _pins()


def _dockerfile_args(path: Path) -> dict[str, str]:
    return dict(ARG_RE.findall(path.read_text()))


def _cluster_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER_DIR.rglob("*") if p.suffix in {".yaml", ".yml"})


def _load_docs(path: Path) -> list:
    with open(path) as f:
        return list(yaml.safe_load_all(f))


def _kuberay_cluster_spec(doc: dict) -> dict:
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    return doc["spec"]


def _pod_specs(cluster_spec: dict):
    """(group name, pod spec) for the head group and every worker group."""
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(KUBERAY_DIR.glob("*.y*ml")):
        try:
            docs = _load_docs(path)
        except yaml.YAMLError:
            continue  # reported by test_cluster_yaml_parses, not at collection time
        out.extend((path, d) for d in docs if isinstance(d, dict))
    return out


def _config_refs(absent: bool = False) -> list[tuple[str, str]]:
    """(config path, file that names it) for every configs/*.yaml in cluster/ and the READMEs
    (the top-level one included). ``absent``: the ones a README says do not ship."""
    sources = _cluster_yaml_files() + [TOP_README, CLUSTER_DIR / "README.md", DOCKER_README]
    sources += sorted((ROOT / "docs").glob("*.md"))
    refs = set()
    for src in sources:
        if src.exists():
            text = src.read_text()
            said_absent = set(ABSENT_REF_RE.findall(text))
            for ref in said_absent if absent else set(CONFIG_REF_RE.findall(text)) - said_absent:
                refs.add((ref, _rel(src)))
    return sorted(refs)


CONFIG_REFS = _config_refs()
ABSENT_CONFIG_REFS = _config_refs(absent=True)


# ---------------------------------------------------------------------------------------------
# (a) Dockerfile ARG versions == pyproject pins


def test_pyproject_has_expected_pins():
    for pkg in ("torch", "ray", "gymnasium", "mujoco", "mlflow", "pydantic"):
        assert pkg in PINS, f"pyproject.toml no longer pins {pkg} with =="


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_version_args_match_pyproject(dockerfile: Path):
    args = _dockerfile_args(dockerfile)
    version_args = {k: v for k, v in args.items() if k.endswith("_VERSION")}
    assert version_args, f"{_rel(dockerfile)}: no ARG *_VERSION=... found"

    for arg, value in version_args.items():
        pkg = _norm(arg[: -len("_VERSION")])
        if pkg == PROJECT_NAME:
            assert value == PROJECT_VERSION, (
                f"{_rel(dockerfile)}: ARG {arg}={value} but [project].version is {PROJECT_VERSION}"
            )
        elif pkg == "python":
            assert _satisfies(value, PROJECT["requires-python"]), (
                f"{_rel(dockerfile)}: ARG {arg}={value} violates requires-python "
                f"{PROJECT['requires-python']}"
            )
        else:
            assert pkg in PINS, (
                f"{_rel(dockerfile)}: ARG {arg} has no matching '==' pin in pyproject.toml"
            )
            assert _public(value) == _public(PINS[pkg]), (
                f"{_rel(dockerfile)}: ARG {arg}={value} but pyproject.toml pins {pkg}=={PINS[pkg]}"
            )

    # The other direction: every == pin and the project version must be an ARG.
    expected = {f"{re.sub('-', '_', pkg).upper()}_VERSION" for pkg in PINS}
    expected.add(f"{PROJECT_NAME.replace('-', '_').upper()}_VERSION")
    missing = sorted(expected - set(version_args))
    assert not missing, f"{_rel(dockerfile)}: missing ARG(s) {missing} for pyproject pins"


def test_dockerfiles_agree_on_versions():
    cpu, cuda = (_dockerfile_args(p) for p in DOCKERFILES)
    for arg in sorted(k for k in cpu if k.endswith("_VERSION")):
        assert arg in cuda, f"Dockerfile.cuda lacks ARG {arg}"
        assert _public(cpu[arg]) == _public(cuda[arg]), (
            f"ARG {arg}: Dockerfile={cpu[arg]} vs Dockerfile.cuda={cuda[arg]}"
        )


def test_dockerfiles_take_torch_from_pytorch_index():
    cpu = DOCKERFILES[0].read_text()
    cuda = DOCKERFILES[1].read_text()
    assert "https://download.pytorch.org/whl/cpu" in cpu
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in cuda or re.search(
        r"https://download\.pytorch\.org/whl/cu\d+", cuda
    )
    for text in (cpu, cuda):
        assert '"torch==${TORCH_VERSION}"' in text
        assert re.search(r"^USER ray\s*$", text, re.MULTILINE), "image must run as user ray"
        assert re.search(r"^WORKDIR /app\s*$", text, re.MULTILINE)


def test_dockerignore_keeps_sources_and_drops_local_state():
    lines = {
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for must in (".git", ".venv", "runs", "mlruns", "mlflow.db", "bench/results"):
        assert must in lines, f".dockerignore should exclude {must}"
    for needed in ("pyproject.toml", "gogepo_ray", "configs", "README.md", "docker"):
        assert needed not in lines, f".dockerignore must not exclude {needed}"


# ---------------------------------------------------------------------------------------------
# (b) image tags: used in cluster manifests, documented in docker/README.md, tagged with version


def _documented_tags() -> set[str]:
    return set(IMAGE_RE.findall(DOCKER_README.read_text()))


def test_docker_readme_documents_both_images():
    tags = _documented_tags()
    assert PROJECT_VERSION in tags, (
        f"docker/README.md does not document {IMAGE_REPO}:{PROJECT_VERSION}"
    )
    assert f"{PROJECT_VERSION}-cuda" in tags, (
        f"docker/README.md does not document {IMAGE_REPO}:{PROJECT_VERSION}-cuda"
    )
    for tag in tags:
        assert tag == PROJECT_VERSION or tag.startswith(PROJECT_VERSION + "-"), (
            f"docker/README.md documents stale tag {tag} (project version {PROJECT_VERSION})"
        )


@pytest.mark.parametrize("manifest", _cluster_yaml_files(), ids=_rel)
def test_manifest_image_tags_are_documented_and_current(manifest: Path):
    used = set(IMAGE_RE.findall(manifest.read_text()))
    assert used, f"{_rel(manifest)} does not use {IMAGE_REPO}"
    documented = _documented_tags()
    for tag in sorted(used):
        assert tag in documented, (
            f"{_rel(manifest)} uses {IMAGE_REPO}:{tag}, not in docker/README.md"
        )
        version, _, variant = tag.partition("-")
        assert version == PROJECT_VERSION, (
            f"{_rel(manifest)} uses {IMAGE_REPO}:{tag}; project version is {PROJECT_VERSION}"
        )
        assert variant in IMAGE_VARIANTS, f"{_rel(manifest)}: unknown image variant {variant!r}"


def test_no_foreign_ray_images_in_manifests():
    for manifest in _cluster_yaml_files():
        assert "rayproject/ray" not in manifest.read_text(), (
            f"{_rel(manifest)} uses a stock rayproject image instead of {IMAGE_REPO}"
        )


# ---------------------------------------------------------------------------------------------
# (c) every configs/*.yaml named in cluster/ and the READMEs exists (looked up at run time)


def test_some_config_is_referenced():
    assert CONFIG_REFS, "expected cluster/ or the READMEs to name at least one configs/*.yaml"
    assert "README.md" in {source for _, source in CONFIG_REFS}, "README.md was not read"


@pytest.mark.parametrize("ref,source", CONFIG_REFS, ids=[f"{r}@{s}" for r, s in CONFIG_REFS])
def test_referenced_config_exists(ref: str, source: str):
    assert (ROOT / ref).is_file(), f"{source} names {ref}, which does not exist in the repo"


@pytest.mark.parametrize(
    "ref,source", ABSENT_CONFIG_REFS, ids=[f"{r}@{s}" for r, s in ABSENT_CONFIG_REFS]
)
def test_config_said_not_to_ship_is_absent(ref: str, source: str):
    assert not (ROOT / ref).exists(), f"{source} says {ref} does not ship, but it is in the repo"


# ---------------------------------------------------------------------------------------------
# (d) YAML parses; KubeRay manifests have the right kinds, rayVersion, auth, GPU group


@pytest.mark.parametrize("path", _cluster_yaml_files(), ids=_rel)
def test_cluster_yaml_parses(path: Path):
    docs = _load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), (
        f"{_rel(path)}: empty or non-mapping doc"
    )


def test_expected_kuberay_files_and_kinds():
    kinds = {(p.name, d.get("kind")) for p, d in _kuberay_docs()}
    assert ("raycluster.yaml", "RayCluster") in kinds
    assert ("rayjob.yaml", "RayJob") in kinds


@pytest.mark.parametrize(
    "path,doc", _kuberay_docs(), ids=[f"{p.name}:{d.get('kind')}" for p, d in _kuberay_docs()]
)
def test_kuberay_manifest(path: Path, doc: dict):
    where = _rel(path)
    assert doc.get("apiVersion") == "ray.io/v1", f"{where}: apiVersion {doc.get('apiVersion')}"
    assert doc.get("kind") in {"RayCluster", "RayJob"}, f"{where}: kind {doc.get('kind')}"
    spec = _kuberay_cluster_spec(doc)
    assert spec.get("rayVersion") == PINS["ray"], (
        f"{where}: rayVersion {spec.get('rayVersion')!r} != ray pin {PINS['ray']}"
    )
    # Token auth stays on.
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode != token"

    gpu_groups = []
    for group, pod in _pod_specs(spec):
        for c in pod["containers"]:
            assert c["image"].startswith(IMAGE_REPO + ":"), f"{where}/{group}: image {c['image']}"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI"), f"{where}/{group}: MLFLOW_TRACKING_URI not set"
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}):
                gpu_groups.append((group, c))
    assert len(gpu_groups) == 1, f"{where}: expected exactly one GPU worker group"
    group, container = gpu_groups[0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"] == f"{IMAGE_REPO}:{PROJECT_VERSION}-cuda", (
        f"{where}/{group}: GPU group should run the -cuda image"
    )
    gpu_spec = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == group)
    assert gpu_spec["replicas"] == 0 and gpu_spec["minReplicas"] == 0, (
        f"{where}/{group}: the GPU group must be optional (replicas/minReplicas 0)"
    )


def test_launcher_config_structure():
    cfg = _load_docs(LAUNCHER_YAML)[0]
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert {"cpu_workers", "gpu_learner"} <= set(types)
    for name, node in types.items():
        assert "node_config" in node and "resources" in node, f"node type {name} incomplete"
        if name != cfg["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"], f"{name}: min/max workers"
    assert cfg["max_workers"] >= sum(
        n["max_workers"] for k, n in types.items() if k != cfg["head_node_type"]
    )
    gpu = types["gpu_learner"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == 1
    assert gpu["resources"].get("GPU") == 1
    assert gpu["docker"]["worker_image"] == f"{IMAGE_REPO}:{PROJECT_VERSION}-cuda"
    assert cfg["docker"]["image"] == f"{IMAGE_REPO}:{PROJECT_VERSION}"
    # Token auth on every node, MLflow configured.
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    assert "MLFLOW_TRACKING_URI=" in run_options
    # Explicit (even if empty) so Ray's defaults (which pip-install other Ray wheels) are not used.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in cfg, f"ray-cluster.yaml must set {key} explicitly"
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


# ---------------------------------------------------------------------------------------------
# (e) the RayJob runs the gogepo CLI


def test_rayjob_entrypoint():
    docs = [d for d in _load_docs(RAYJOB_YAML) if d and d.get("kind") == "RayJob"]
    assert len(docs) == 1
    spec = docs[0]["spec"]
    entrypoint = spec["entrypoint"].strip()
    assert entrypoint.startswith("gogepo train "), f"entrypoint: {entrypoint!r}"
    assert CONFIG_REF_RE.search(entrypoint), "entrypoint should name a configs/*.yaml"
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode"}
