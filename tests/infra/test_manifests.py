"""infra/: the Dockerfiles, the compose stack and the KubeRay manifests parse, pin their images,
publish nothing beyond 127.0.0.1, hold no literal secret, size every Kubernetes container, agree
on the Ray version, and only run commands that the real CLIs (omniforge, ray, mlflow) accept.

No Docker or Kubernetes is needed: files are parsed, command lines are parsed by the click
commands themselves, and the configs they name are validated like `omniforge` would.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKER = INFRA / "docker"
COMPOSE_DIR = INFRA / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S = INFRA / "k8s"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
K8S_FILES = sorted(K8S.glob("*.yaml"))
LOOPBACK = "127.0.0.1"

# Names of settings that hold a secret: POSTGRES_PASSWORD, AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN...
SECRET_NAME = re.compile(r"password|passwd|secret|token|access_key|_key$", re.IGNORECASE)
# ${VAR}, ${VAR:?message}, ${VAR?message}, ${VAR:-} (no default value): no literal secret.
ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?\?[^}]*)|(?::?-))?\}$")
URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:([^@\s]*)@")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------------------------------------
# Checkers (each has a test below that feeds it something wrong)
# ---------------------------------------------------------------------------------------------


def expand(text: str) -> str:
    """Compose-style interpolation with the file's defaults: ``${X:-d}`` -> d, ``${X:?m}`` /
    ``${X}`` -> ``X`` (a stand-in value), ``$$`` -> ``$``."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op in (":-", "-"):
            return arg
        return name

    return VARIABLE.sub(sub, text).replace("$$", "$")


def image_problem(ref: str) -> str | None:
    """An image reference must name a fixed version: a tag other than latest, or a digest."""
    image = expand(ref)
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag at all (a ':' only in a registry host:port)
        return f"image {ref!r} has no tag: pin a version"
    if tag == "latest":
        return f"image {ref!r} uses :latest: pin a version"
    return None


def port_problem(spec: Any) -> str | None:
    """A published compose port must be bound to 127.0.0.1 (short or long syntax)."""
    if isinstance(spec, dict):
        if "published" not in spec:
            return None  # exposed to the compose network only
        host_ip = spec.get("host_ip")
        return None if host_ip == LOOPBACK else f"port {spec} is not bound to {LOOPBACK}"
    text = expand(str(spec))
    if not text.startswith(LOOPBACK + ":") or text.count(":") < 2:
        return f"port {spec!r} is not bound to {LOOPBACK} (use '{LOOPBACK}:HOST:CONTAINER')"
    return None


def value_problem(where: str, name: str, value: Any) -> str | None:
    """A setting named like a secret must come from the environment or a secretKeyRef; a URL
    anywhere must not carry a literal password."""
    if not isinstance(value, str):
        return None
    if SECRET_NAME.search(name) and value and not ENV_REF.match(value):
        return f"{where}: {name} holds a literal value; use ${{{name}:?...}} or a secretKeyRef"
    for password in URL_PASSWORD.findall(value):
        if not ENV_REF.match(password):
            return f"{where}: {name} has a URL with a literal password"
    return None


def secret_problems(obj: Any, where: str = "") -> list[str]:
    """Walk a parsed YAML document: mappings, lists, Kubernetes env entries."""
    problems: list[str] = []
    if isinstance(obj, dict):
        if {"name", "value"} <= obj.keys() and isinstance(obj.get("name"), str):
            problem = value_problem(where, obj["name"], obj["value"])
            problems += [problem] if problem else []
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{where}: a Secret with values; create it with kubectl instead")
        for key, value in obj.items():
            if key in ("secretKeyRef", "configMapKeyRef", "secretRef"):
                continue  # a reference by name, not a value
            problem = value_problem(where, str(key), value)
            problems += [problem] if problem else []
            problems += secret_problems(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            problems += secret_problems(item, f"{where}[{i}]")
    return problems


@functools.cache
def cli_roots() -> dict[str, Any]:
    import typer

    from orchestration.cli import app

    return {"omniforge": typer.main.get_command(app)}


@functools.cache
def extra_root(prog: str) -> Any:
    """The ray and mlflow CLIs, imported only when a command line uses them."""
    if prog == "ray":
        from ray.scripts.scripts import cli

        return cli
    if prog == "mlflow":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mlflow's own import-time deprecations
            from mlflow.cli import cli
        return cli
    return None


@functools.cache
def click_errors() -> tuple[type[Exception], ...]:
    """click's usage errors, and those of the click copy that newer typer releases vendor."""
    errors: list[type[Exception]] = [click.ClickException]
    try:
        vendored = importlib.import_module("typer._click.exceptions")
        errors.append(vendored.ClickException)
    except ImportError:
        pass
    return tuple(errors)


def is_group(cmd: Any) -> bool:
    return hasattr(cmd, "list_commands") and hasattr(cmd, "get_command")


def new_context(cmd: Any) -> Any:
    return getattr(cmd, "context_class", click.Context)(cmd)


def checked_programs() -> set[str]:
    return {"omniforge", "ray", "mlflow"}


def cli_problems(argv: list[str]) -> list[str]:
    """Resolve ``argv`` against the real click command tree: every subcommand must exist, every
    option must be known with a valid value, required ones present. omniforge's own configs
    (``--set``, ``--config``, recipes, ``--stages``) are validated as the command would."""
    prog, args = argv[0], list(argv[1:])
    root = cli_roots().get(prog) or extra_root(prog)
    if root is None:
        return [f"{prog}: not a CLI these tests know"]
    cmd = root
    names = [prog]
    while is_group(cmd) and args and not args[0].startswith("-"):
        sub = cmd.get_command(new_context(cmd), args[0])
        if sub is None:
            known = ", ".join(sorted(cmd.list_commands(new_context(cmd))))
            return [f"{' '.join(names)}: no command {args[0]!r} (has: {known})"]
        names.append(args.pop(0))
        cmd = sub
    if args == ["--help"]:
        return []
    if is_group(cmd):
        return [f"{' '.join(names)}: needs a subcommand"]
    try:
        ctx = cmd.make_context(" ".join(names), args)
    except click_errors() as e:
        return [f"{shlex.join(argv)}: {e.format_message()}"]
    if prog == "omniforge":
        return omniforge_semantics(names[1:], ctx.params, shlex.join(argv))
    return []


def omniforge_semantics(path: list[str], params: dict[str, Any], line: str) -> list[str]:
    """What the command itself would refuse after parsing: configs, recipes, stage ranges. Files
    named by path must be in the repository; a setting that has no effect counts as a problem."""
    from core.config import ConfigError, ConfigWarning, load_config

    config = params.get("config")
    if config is not None and not (REPO / config).is_file():
        return [f"{line}: --config {config} is not a file in the repository"]
    problems: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigWarning)
            if path == ["curate", "run"]:
                from curation.config import CurationConfig

                overrides = list(params["set_"])
                if params.get("kind"):
                    overrides.append(f"kind={params['kind']}")
                load_config(CurationConfig, REPO / config if config else None, overrides)
            elif path in (["train", "run"], ["train", "plan"]):
                from orchestration.train_cmd import RECIPES, parse_stages, recipe_path
                from training.recipe import Recipe

                name = str(params["recipe"])
                builtin = RECIPES / f"{name.removesuffix('.yaml')}.yaml"
                recipe = builtin if builtin.is_file() else REPO / name
                if not recipe.is_file():
                    recipe = recipe_path(name)  # raises FileNotFoundError naming the built-ins
                r = load_config(Recipe, recipe, list(params["set_"]))
                parse_stages(params.get("stages"), len(r.stages))
        problems += [
            f"{line}: {w.message}" for w in caught if issubclass(w.category, ConfigWarning)
        ]
    except (ConfigError, FileNotFoundError, ValueError) as e:
        problems.append(f"{line}: {e}")
    return problems


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, rest = full.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def dockerfile_args(instrs: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    return args


def k8s_documents() -> Iterator[tuple[Path, dict]]:
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def ray_cluster_specs() -> Iterator[tuple[str, dict]]:
    for path, doc in k8s_documents():
        if doc["kind"] == "RayCluster":
            yield f"{path.name}:{doc['metadata']['name']}", doc["spec"]
        elif doc["kind"] == "RayJob" and doc["spec"].get("rayClusterSpec"):
            yield f"{path.name}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> Iterator[tuple[str, dict, dict]]:
    """(group name, group spec, pod spec) for the head and every worker group."""
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group, group["template"]["spec"]


def all_containers(obj: Any) -> Iterator[dict]:
    if isinstance(obj, dict):
        for key in ("containers", "initContainers"):
            yield from obj.get(key) or []
        for value in obj.values():
            yield from all_containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from all_containers(item)


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def command_argv(command: Any) -> list[str]:
    if isinstance(command, list):
        return [expand(str(c)) for c in command]
    return shlex.split(expand(str(command)))


def env_example(path: Path) -> dict[str, tuple[str, bool]]:
    """KEY -> (value, commented out)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            out[m.group(2)] = (m.group(3), bool(m.group(1)))
    return out


# ---------------------------------------------------------------------------------------------
# The checkers reject what they must
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "8265:8265",
        "0.0.0.0:8265:8265",
        "8265",
        "${HOST:-0.0.0.0}:5000:5000",
        {"target": 80, "published": 80},
    ],
)
def test_port_checker_rejects_ports_not_bound_to_loopback(spec):
    assert port_problem(spec) is not None


@pytest.mark.parametrize(
    "spec",
    [
        "127.0.0.1:8265:8265",
        "127.0.0.1:${RAY_DASHBOARD_PORT:-8265}:8265",
        {"target": 80, "published": 80, "host_ip": "127.0.0.1"},
    ],
)
def test_port_checker_accepts_loopback_ports(spec):
    assert port_problem(spec) is None


@pytest.mark.parametrize(
    "ref", ["postgres", "postgres:latest", "${IMG:-omniforge:latest}", "localhost:5000/omniforge"]
)
def test_image_checker_rejects_unpinned_images(ref):
    assert image_problem(ref) is not None


def test_image_checker_accepts_pinned_images():
    for ref in [
        "postgres:17.6-bookworm",
        "${IMG:-omniforge:0.1.0-cpu}",
        "registry:5000/a/b:1.2",
        "a@sha256:" + "0" * 64,
    ]:
        assert image_problem(ref) is None, ref


def test_secret_checker_rejects_literal_secrets():
    bad = [
        {"environment": {"POSTGRES_PASSWORD": "hunter2"}},
        {"environment": {"MINIO_ROOT_PASSWORD": "${MINIO_ROOT_PASSWORD:-hunter2}"}},
        {"environment": {"OMNIFORGE_CATALOG_URL": "postgresql://u:hunter2@db:5432/x"}},
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]},
        {"kind": "Secret", "stringData": {"x": "y"}},
    ]
    for doc in bad:
        assert secret_problems(doc), doc
    good = {
        "environment": {
            "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}",
            "OMNIFORGE_CATALOG_URL": "postgresql://u:${POSTGRES_PASSWORD:?x}@db:5432/x",
            "RAY_AUTH_MODE": "token",
        },
        "env": [
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
            }
        ],
    }
    assert secret_problems(good) == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["omniforge", "submitt", "curate"], "no command 'submitt'"),
        (["omniforge", "train", "run", "omni_video_tiny", "--stage", "1"], "No such option"),
        (["omniforge", "curate", "run", "--output", "/data/x"], "--input"),
        (["omniforge", "train", "run", "omni_video_tiny", "--workers", "two"], "two"),
        (["omniforge", "train", "run", "omni_video_tiny", "--stages", "4"], "stages 1..3"),
        (["omniforge", "train", "run", "no_such_recipe"], "not found"),
        (
            [
                "omniforge",
                "curate",
                "run",
                "--input",
                "a",
                "--output",
                "b",
                "--set",
                "split.treshold=3",
            ],
            "split.treshold",
        ),
        (
            [
                "omniforge",
                "curate",
                "run",
                "--input",
                "a",
                "--output",
                "b",
                "--config",
                "nope.yaml",
            ],
            "nope.yaml",
        ),
        (["ray", "start", "--head", "--dashbord-host=0.0.0.0"], "No such option"),
    ],
)
def test_cli_checker_rejects_commands_the_cli_would_refuse(argv, expected):
    problems = cli_problems(argv)
    assert problems and any(expected in p for p in problems), problems


def test_cli_checker_accepts_a_valid_command():
    argv = [
        "omniforge",
        "train",
        "run",
        "omni_video_tiny",
        "--stages",
        "2-3",
        "--workers",
        "2",
        "--resume",
    ]
    assert cli_problems(argv) == []


# ---------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------


def test_the_three_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cpu", "Dockerfile.mlflow"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_and_runs_a_real_command(path):
    instrs = dockerfile_instructions(path)
    args = dockerfile_args(instrs)
    froms = [rest.split()[0] for instr, rest in instrs if instr == "FROM"]
    assert froms
    for ref in froms:
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)
        if resolved in {"uv"}:  # an earlier stage
            continue
        assert image_problem(resolved) is None, image_problem(resolved)
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), (
        "numeric USER (Kubernetes runAsNonRoot checks it)"
    )
    assert any(instr == "WORKDIR" for instr, _ in instrs)
    cmd = [rest for instr, rest in instrs if instr == "CMD"]
    assert len(cmd) == 1
    argv = json.loads(cmd[0])  # exec form
    assert cli_problems(argv) == []
    for instr, rest in instrs:
        if instr == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"{path.name}: COPY {src}: not in the repository"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_omniforge_images_pin_torch_and_ray_like_the_project(name):
    import ray

    instrs = dockerfile_instructions(DOCKER / name)
    runs = [rest for instr, rest in instrs if instr == "RUN" and "pip install" in rest]
    assert runs and all("-c /tmp/src/constraints.txt" in r for r in runs), (
        "every pip install is constrained"
    )
    assert "grep -E '^torch==' /tmp/src/constraints.txt" in runs[0], (
        "torch is installed first, from the pin"
    )
    pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert pin, "constraints.txt pins torch"
    assert any('"/tmp/src[s3,postgres]"' in r for r in runs)
    ray_version = dockerfile_args(instrs)["RAY_VERSION"]
    assert ray_version.split(".")[:2] == ray.__version__.split(".")[:2]
    ray_spec = re.search(r'"ray\[[^\]]*\](>=[^"]+)"', (REPO / "pyproject.toml").read_text())
    from packaging.specifiers import SpecifierSet

    assert ray_spec and ray_version in SpecifierSet(ray_spec.group(1))


def test_mlflow_server_image_matches_the_client_major_version():
    import mlflow

    version = dockerfile_args(dockerfile_instructions(DOCKER / "Dockerfile.mlflow"))[
        "MLFLOW_VERSION"
    ]
    assert version.split(".")[0] == mlflow.__version__.split(".")[0]


def test_dockerignore_files_belong_to_dockerfiles():
    for ignore in DOCKER.glob("*.dockerignore"):
        assert (DOCKER / ignore.name.removesuffix(".dockerignore")).exists()


# ---------------------------------------------------------------------------------------------
# Compose stack
# ---------------------------------------------------------------------------------------------


def test_compose_services_and_dependencies():
    services = compose()["services"]
    for name in (
        "postgres",
        "minio",
        "minio-init",
        "mlflow",
        "catalog-migrate",
        "ray-head",
        "ray-worker",
    ):
        assert name in services
    one_shot = {n for n, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"minio-init", "catalog-migrate"}
    for name, service in services.items():
        if name not in one_shot:
            assert "healthcheck" in service, f"{name}: no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
            elif condition == "service_completed_successfully":
                assert dep in one_shot
    assert "ray-head" in services["ray-worker"]["depends_on"]


def test_compose_images_are_pinned_and_builds_point_into_the_repo():
    for name, service in compose()["services"].items():
        assert image_problem(service["image"]) is None, f"{name}: {image_problem(service['image'])}"
        build = service.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context == REPO, f"{name}: build context must be the repository root"
            assert (context / build["dockerfile"]).is_file()


def test_compose_publishes_only_on_loopback():
    published = 0
    for name, service in compose()["services"].items():
        assert service.get("network_mode") != "host", name
        for spec in service.get("ports", []):
            published += 1
            assert port_problem(spec) is None, f"{name}: {port_problem(spec)}"
    assert published >= 5


def test_compose_has_no_literal_secrets_and_every_variable_is_documented():
    text = COMPOSE_FILE.read_text()
    assert secret_problems(compose()) == []
    documented = env_example(COMPOSE_DIR / ".env.example")
    used = {m.group(1) for m in VARIABLE.finditer(text)}
    assert used <= documented.keys(), f"not in .env.example: {sorted(used - documented.keys())}"
    required = {m.group(1) for m in VARIABLE.finditer(text) if m.group(2) in (":?", "?")}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN"} <= required
    for key, (value, _) in documented.items():
        if SECRET_NAME.search(key) or key in required:
            assert value == "", f".env.example must not carry a value for {key}"


def test_compose_bind_mounts_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = expand(volume).split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"


def test_compose_ray_nodes_share_storage_and_the_catalog():
    services = compose()["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["volumes"] == worker["volumes"]
    assert head["environment"] == worker["environment"]
    url = expand(head["environment"]["OMNIFORGE_CATALOG_URL"])
    assert url.startswith("postgresql://") and url.endswith("@postgres:5432/omniforge")
    from catalog.store import ENV_URL

    assert ENV_URL in head["environment"]


COMPOSE_COMMANDS = [
    (name, command_argv(s["command"]))
    for name, s in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items()
    if "command" in s
]


@pytest.mark.parametrize(
    "argv",
    [argv for _, argv in COMPOSE_COMMANDS if argv[0] in checked_programs()],
    ids=[name for name, argv in COMPOSE_COMMANDS if argv[0] in checked_programs()],
)
def test_compose_commands_resolve_against_the_real_clis(argv):
    assert cli_problems(argv) == []


def test_compose_ray_head_binds_dashboard_inside_and_loopback_outside():
    argv = command_argv(compose()["services"]["ray-head"]["command"])
    assert "--dashboard-host=0.0.0.0" in argv and "--block" in argv
    assert any(
        expand(p).startswith("127.0.0.1:") and p.endswith(":8265")
        for p in compose()["services"]["ray-head"]["ports"]
    )


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------


def test_k8s_files_parse_and_use_ray_io_v1():
    kinds = {}
    for path, doc in k8s_documents():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
        kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1", path.name
    assert kinds.keys() >= {"RayCluster", "RayJob", "PersistentVolumeClaim"}
    assert len(kinds["RayJob"]) == 2


def test_k8s_ray_version_matches_the_image_and_the_installed_ray():
    import ray

    image_ray = dockerfile_args(dockerfile_instructions(DOCKER / "Dockerfile"))["RAY_VERSION"]
    specs = list(ray_cluster_specs())
    assert len(specs) == 2
    for where, spec in specs:
        assert spec["rayVersion"] == image_ray, where
        assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2], where


def test_k8s_every_container_is_sized_pinned_and_non_root():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(
        1
    )
    count = 0
    for path, doc in k8s_documents():
        for container in all_containers(doc):
            count += 1
            where = f"{path.name}:{doc['metadata']['name']}:{container['name']}"
            assert image_problem(container["image"]) is None, where
            if container["image"].startswith("omniforge:"):
                assert container["image"].split(":")[1].startswith(version), where
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= (resources.get(kind) or {}).keys(), f"{where}: {kind}"
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False
    assert count >= 5
    for where, spec in ray_cluster_specs():
        for _, _, pod in pod_specs(spec):
            ctx = pod["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, where


def test_k8s_gpu_groups_have_gpu_limits_and_cpu_groups_none():
    gpu_groups = 0
    for where, spec in ray_cluster_specs():
        for group, _, pod in pod_specs(spec):
            for container in pod["containers"]:
                limits = container["resources"]["limits"]
                requests = container["resources"]["requests"]
                if "gpu" in group:
                    gpu_groups += 1
                    assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}:{group}"
                    assert (
                        requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])
                        == limits["nvidia.com/gpu"]
                    )
                else:
                    assert "nvidia.com/gpu" not in limits, f"{where}:{group}"
    assert gpu_groups == 2


def test_k8s_ray_start_params_are_real_ray_start_options():
    for where, spec in ray_cluster_specs():
        for group, group_spec, _ in pod_specs(spec):
            params = group_spec.get("rayStartParams") or {}
            assert all(isinstance(v, str) for v in params.values()), (
                f"{where}:{group}: strings only"
            )
            argv = ["ray", "start"] + (["--head"] if group == "head" else ["--address=head:6379"])
            argv += [f"--{k}={v}" for k, v in params.items()]
            assert cli_problems(argv) == [], f"{where}:{group}"


def test_k8s_has_no_literal_secrets_and_every_secret_key_is_documented():
    documented = env_example(K8S / "omniforge-secrets.env.example")
    refs = 0
    for path, doc in k8s_documents():
        assert secret_problems(doc) == [], path.name
        for container in all_containers(doc):
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if not ref:
                    continue
                refs += 1
                assert ref["name"] == "omniforge-secrets"
                assert ref["key"] in documented, ref["key"]
                _, commented = documented[ref["key"]]
                assert commented == bool(ref.get("optional")), (
                    f"{ref['key']}: optional <=> commented"
                )
    assert refs > 0
    for key, (value, _) in documented.items():
        assert value == "", f"omniforge-secrets.env.example must not carry a value for {key}"


def test_k8s_volumes_claim_the_defined_pvcs():
    claims = {
        d["metadata"]["name"] for _, d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"
    }
    used = set()
    for where, spec in ray_cluster_specs():
        for _, _, pod in pod_specs(spec):
            mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert mounts <= volumes.keys(), where
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    used.add(v["persistentVolumeClaim"]["claimName"])
    assert used == claims


def test_k8s_rayjobs_are_valid_for_kuberay_and_run_real_commands():
    clusters = {d["metadata"]["name"] for _, d in k8s_documents() if d["kind"] == "RayCluster"}
    commands = {}
    for _, doc in k8s_documents():
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
        selector = spec.get("clusterSelector")
        assert bool(selector) != bool(spec.get("rayClusterSpec")), name
        if selector:
            assert selector["ray.io/cluster"] in clusters
            assert not spec.get("shutdownAfterJobFinishes")
        if not spec.get("shutdownAfterJobFinishes"):
            assert not spec.get("ttlSecondsAfterFinished"), "KubeRay rejects a TTL without shutdown"
        argv = shlex.split(spec["entrypoint"])
        assert "\n" not in spec["entrypoint"], "a folded entrypoint must be one line"
        assert cli_problems(argv) == [], name
        commands[name] = argv
    curate = next(a for a in commands.values() if a[1:3] == ["curate", "run"])
    train = next(a for a in commands.values() if a[1:3] == ["train", "run"])
    for argv in (curate, train):
        assert argv[argv.index("--address") + 1] == "auto"
        assert argv[argv.index("--output") + 1].startswith("/data/"), "outputs on the shared PVC"
        assert "--tracking-uri" in argv
    assert "--stages" in train and "--resume" in train
