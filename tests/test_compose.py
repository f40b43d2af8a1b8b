"""docker-compose.yml, .env.example, the Dockerfile and the compose run config, checked offline.

No Docker engine runs here. The checks read the files with pyyaml and resolve `${...}` as
Compose does; check-jsonschema (from PyPI, with the Compose Specification's schema bundled)
validates the file and its resolved form, so no Debian package is needed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUN_CONFIG = ROOT / "docker" / "booksmith.compose.yaml"
PREFECT_YAML = ROOT / "prefect.yaml"
PACKAGES = ("schemas", "prompts", "generation", "filters", "shards", "flows", "trainer")

# Service -> the profile it belongs to (None: started by a plain `docker compose up`).
EXPECTED_SERVICES: dict[str, str | None] = {
    "postgres": None,
    "prefect-server": None,
    "prefect-services": None,
    "worker": None,
    "redis": None,
    "minio": None,
    "vllm": "gpu",
    "llamacpp": "cpu",
}
# Jobs that run once and exit: no health check, no restart policy.
ONE_SHOT = {"prefect-migrate", "minio-init", "llamacpp-model"}
# Secrets compose must refuse to start without.
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD",
    "PREFECT_API_AUTH_STRING",
    "LLM_API_KEY",
    "MINIO_ROOT_PASSWORD",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING")
# Variables Compose itself reads from .env (never written as ${...} in the file).
COMPOSE_OWN = {"COMPOSE_PROJECT_NAME"}
# What the worker must carry whatever the code says today (the list).
WORKER_ENV = {
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "OPENAI_API_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "BOOKSMITH_REDIS_URL",
}
# Variables the code reads that the worker may leave unset: alternatives to ones it sets, or
# settings for other contexts (torchrun's rank variables, tiktoken's cache, pytest).
CODE_ENV_OPTIONAL = {
    "AWS_ENDPOINT_URL_S3",  # alternative to AWS_ENDPOINT_URL
    "AWS_REGION",  # alternative to AWS_DEFAULT_REGION
    "AWS_PROFILE",  # credentials come as keys here
    "BOOKSMITH_DEBUG",  # tracebacks behind error lines: a switch for a person at a terminal
}
CODE_ENV_PREFIXES = ("OPENAI_", "AWS_", "BOOKSMITH_", "PREFECT_API_")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; "$$" is a literal $.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _strings(value: Any) -> Iterator[str]:
    """Every string value in a loaded YAML document (what Compose interpolates; not comments)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _uses() -> Iterator[tuple[str, str | None, str]]:
    """(name, operator, argument) for every ${...} in docker-compose.yml's values."""
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for text in _strings(data):
        for m in _VAR.finditer(text.replace("$$", "")):
            yield m.group(1), m.group(2), m.group(3) or ""


def _env_example() -> dict[str, str]:
    """Variables of .env.example; each must have a comment on the line above it."""
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    values: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f".env.example:{i + 1}: {line!r}"
        assert name not in values, f".env.example:{i + 1}: {name} set twice"
        assert i > 0 and lines[i - 1].lstrip().startswith("#"), (
            f".env.example:{i + 1}: {name} has no comment on the line above saying what it is"
        )
        values[name] = value
    return values


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's substitution, for checking what a value becomes with `env` (unset: absent)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (":-", "-"):
            use_default = current is None or (op == ":-" and current == "")
            return arg if use_default else str(current)
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise LookupError(f"{name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _dummy_secrets() -> dict[str, str]:
    return {name: f"test-only-{name.lower()}" for name in REQUIRED_SECRETS}


# ---------------------------------------------------------------- services


def test_every_expected_service_exists_with_its_profile(services: dict[str, Any]) -> None:
    missing = sorted(set(EXPECTED_SERVICES) - set(services))
    assert not missing, f"docker-compose.yml lacks services {missing}"
    for name, profile in EXPECTED_SERVICES.items():
        profiles = services[name].get("profiles") or []
        expected = [profile] if profile else []
        assert profiles == expected, f"{name}: profiles {profiles}, expected {expected}"
    # Everything else either always runs or belongs to the LLM service it serves.
    for name, service in services.items():
        assert set(service.get("profiles") or []) <= {"gpu", "cpu"}, name


def test_published_ports_bind_localhost_by_default(services: dict[str, Any]) -> None:
    defaults_only: dict[str, str] = {}
    example = {**_env_example(), **_dummy_secrets()}
    published = 0
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: host networking skips port binding"
        for env in (defaults_only, example):
            for port in service.get("ports") or []:
                published += 1
                if isinstance(port, dict):  # long syntax
                    host_ip = str(_interpolate(port.get("host_ip", ""), env))
                else:
                    parts = str(_interpolate(str(port), env)).split(":")
                    assert len(parts) == 3, f"{name}: port {port!r} names no host address"
                    host_ip = parts[0]
                assert host_ip == "127.0.0.1", f"{name}: port {port!r} binds {host_ip!r}"
    assert published, "no service publishes a port: the UI must be reachable from the host"


def test_every_long_running_service_has_a_health_check(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        if name in ONE_SHOT:
            assert not check, f"{name}: a one-shot job needs no health check"
            assert "restart" not in service, f"{name}: a one-shot job must not be restarted"
            continue
        test = check.get("test")
        assert test and not check.get("disable"), f"{name}: no health check"
        assert test != ["NONE"], f"{name}: health check disabled"
        assert service.get("restart") == "unless-stopped", f"{name}: restart policy"


def test_dependencies_wait_for_health_or_completion(services: dict[str, Any]) -> None:
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions starts too early"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == want, f"{name} -> {dep}: condition {spec}"
            # A service must not wait on one that only some profiles start.
            own = set(service.get("profiles") or [])
            theirs = set(services[dep].get("profiles") or [])
            assert not theirs or theirs <= own, f"{name} depends on {dep} of profile {theirs}"


def test_named_volumes_are_declared_and_used(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("/", ".", "~", "$")):
                continue  # a bind mount of a host path
            assert source in declared, f"{name}: volume {source!r} not declared at the top level"
            used.add(source)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"
    for store, target in {
        "postgres": "/var/lib/postgresql/data",
        "redis": "/data",
        "minio": "/data",
        "worker": "/data",
        "vllm": "/root/.cache/huggingface",
    }.items():
        targets = [str(v).split(":")[1] for v in services[store].get("volumes") or []]
        assert target in targets, f"{store}: nothing persists {target}"


# ---------------------------------------------------------------- variables and secrets


def test_every_variable_is_documented_in_env_example_and_vice_versa() -> None:
    used = {name for name, _, _ in _uses()}
    documented = set(_env_example())
    undocumented = sorted(used - documented)
    assert not undocumented, f"used in docker-compose.yml, not in .env.example: {undocumented}"
    unused = documented - used - COMPOSE_OWN
    assert not unused, f"in .env.example but not used by docker-compose.yml: {sorted(unused)}"


def test_secrets_have_no_literal_default() -> None:
    example = _env_example()
    for name, op, arg in _uses():
        if name in REQUIRED_SECRETS:
            assert op == ":?", f"${{{name}}} must be required: ${{{name}:?message}}"
        elif SECRET_NAME.search(name):
            assert op in (None, ":?") or arg == "", f"${{{name}}} has a default {arg!r}"
    for name, value in example.items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example: {name} must be empty (no real secrets committed)"
    assert set(example) >= REQUIRED_SECRETS


def test_no_secret_is_written_in_a_service(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key) or key.endswith(("_KEY", "_PASSWORD")):
                assert _VAR.fullmatch(value), f"{name}: {key} must come from .env, got {value!r}"


def test_postgres_password_and_prefect_auth_come_only_from_env(services: dict[str, Any]) -> None:
    pg = _environment(services["postgres"])
    assert pg["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for name in ("prefect-migrate", "prefect-server", "prefect-services"):
        env = _environment(services[name])
        url = env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        assert url.startswith("postgresql+asyncpg://prefect:${POSTGRES_PASSWORD:?"), name
        assert url.endswith("@postgres:5432/prefect"), name
        assert env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    worker = _environment(services["worker"])
    assert worker["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    # Without .env the file cannot be used: every required secret stops interpolation.
    for secret in REQUIRED_SECRETS:
        env = {k: v for k, v in {**_env_example(), **_dummy_secrets()}.items() if k != secret}
        with pytest.raises(LookupError, match=secret):
            _interpolate(services, env)


# ---------------------------------------------------------------- the worker and Prefect


def _code_env_reads() -> set[str]:
    pattern = re.compile(
        r"""os\.(?:environ\.get|getenv)\(\s*["']([A-Z0-9_]+)["']|os\.environ\[\s*["']([A-Z0-9_]+)["']"""
    )
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for m in pattern.finditer(path.read_text(encoding="utf-8")):
                names.add(m.group(1) or m.group(2))
    return names


def _dockerfile_env() -> set[str]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    names: set[str] = set()
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            names.update(re.findall(r"([A-Z_][A-Z0-9_]*)=", line))
    return names


def test_worker_environment_carries_what_the_code_reads(services: dict[str, Any]) -> None:
    worker = _environment(services["worker"])
    missing = sorted(WORKER_ENV - set(worker))
    assert not missing, f"worker environment lacks {missing}"
    read = {n for n in _code_env_reads() if n.startswith(CODE_ENV_PREFIXES)}
    assert "AWS_ENDPOINT_URL" in read, "the scan of os.environ reads found nothing: fix the regex"
    provided = set(worker) | _dockerfile_env()
    unset = sorted(read - provided - CODE_ENV_OPTIONAL)
    assert not unset, f"the code reads {unset}, which neither the worker nor the image sets"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["BOOKSMITH_REDIS_URL"] == "redis://redis:6379/0"
    # MinIO's credentials are the worker's S3 credentials.
    minio = _environment(services["minio"])
    assert worker["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert worker["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


def test_worker_serves_the_pool_and_config_that_prefect_yaml_names(
    services: dict[str, Any],
) -> None:
    worker = services["worker"]
    cmd = _command(worker)
    assert cmd[:3] == ["prefect", "worker", "start"], cmd
    pool = cmd[cmd.index("--pool") + 1]
    assert cmd[cmd.index("--type") + 1] == "process"
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in worker["volumes"]}
    deployments = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))["deployments"]
    assert deployments
    for deployment in deployments:
        assert deployment["work_pool"]["name"] == pool, deployment["name"]
        config = (deployment.get("parameters") or {}).get("config")
        if config:
            assert config in mounts or any(config.startswith(t + "/") for t in mounts), (
                f"{deployment['name']}: config {config} is not in the worker's mounts"
            )
    assert mounts.get("/data") == "data"


def test_prefect_api_and_services_run_apart_and_share_redis(services: dict[str, Any]) -> None:
    server_cmd = _command(services["prefect-server"])
    assert server_cmd[:3] == ["prefect", "server", "start"] and "--no-services" in server_cmd
    assert _command(services["prefect-services"]) == ["prefect", "server", "services", "start"]
    server, background = (_environment(services[n]) for n in ("prefect-server", "prefect-services"))
    for key in (
        "PREFECT_MESSAGING_BROKER",
        "PREFECT_MESSAGING_CACHE",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
        "PREFECT_REDIS_MESSAGING_URL",
        "PREFECT_SERVER_DOCKET_URL",
        "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE",
        "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL",
    ):
        assert server.get(key) and server[key] == background.get(key), key
    assert server["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"
    assert server["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] == "false"
    assert _command(services["prefect-migrate"])[:4] == ["prefect", "server", "database", "upgrade"]


def test_prefect_settings_are_real_setting_names(services: dict[str, Any]) -> None:
    """A misspelt PREFECT_* variable is silently ignored by Prefect: check each against the
    installed Prefect's settings (aliases included). PREFECT_REDIS_* belong to prefect-redis,
    which only the image installs."""
    # a private helper of Prefect's: if it moves, this import fails loudly and is updated
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect.settings.models.root import Settings

    valid = set(_get_valid_setting_names(Settings))
    used = {n for n in _dockerfile_env() if n.startswith("PREFECT_")}
    for service in services.values():
        used |= {k for k in _environment(service) if k.startswith("PREFECT_")}
    unknown = sorted(n for n in used - valid if not n.startswith("PREFECT_REDIS_"))
    assert not unknown, f"not Prefect settings: {unknown}"


# ---------------------------------------------------------------- LLM services


def test_llm_services_serve_openai_compatible_apis(services: dict[str, Any]) -> None:
    vllm, llamacpp = services["vllm"], services["llamacpp"]
    assert str(vllm["image"]).startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices), "vllm reserves no GPU"
    assert "${VLLM_MODEL" in _command(vllm)[0], "vllm's model must come from .env (VLLM_MODEL)"
    assert any(str(v).startswith("hf-cache:") for v in vllm["volumes"])
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert vllm["ports"][0].endswith(":8000:8000")

    assert llamacpp["image"] == "ghcr.io/ggml-org/llama.cpp:server"
    cmd = _command(llamacpp)
    assert "--parallel" in cmd and "--cont-batching" in cmd
    assert "/health" in " ".join(llamacpp["healthcheck"]["test"])
    assert llamacpp["ports"][0].endswith(":8080:8080")
    for service in (vllm, llamacpp):
        assert any(v.startswith("${LLM_API_KEY:?") for v in _environment(service).values())


# ---------------------------------------------------------------- image and run config


def test_dockerfile_installs_the_project() -> None:
    assert DOCKERFILE.is_file(), "Dockerfile missing"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim", text, re.M)
    assert re.search(r"^ARG PYTHON_VERSION=3\.1[12]$", text, re.M)
    assert re.search(r'pip install --no-deps -e "\.\[embedded\]"', text), "project not installed"
    assert "-DGGML_NATIVE=OFF" in text, "llama.cpp must be built portably (see FACTS.md)"
    assert "torch==${TORCH_VERSION}" in text and "whl/cpu" in text, "torch: the CPU build"
    assert "prefect-redis" in text, "the Prefect server's Redis messaging needs prefect-redis"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image must not run as root"
    # As a non-root user the Prefect server cannot copy its UI into site-packages.
    assert "PREFECT_UI_STATIC_DIRECTORY=" in text
    assert "docker/healthcheck.py" in COMPOSE.read_text(encoding="utf-8")
    assert (ROOT / "docker" / "healthcheck.py").is_file()
    ignored = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    assert ".env" in ignored and ".venv" in ignored, ".dockerignore must keep secrets out"
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_compose_run_config_fits_the_stack(services: dict[str, Any]) -> None:
    from booksmith.schemas.config import load_config

    cfg = load_config(RUN_CONFIG)
    assert cfg.generation.backend == "openai"
    base_url = str(cfg.generation.base_url)
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/v1", base_url)
    assert m and m.group(1) in ("vllm", "llamacpp"), base_url
    assert any(p.endswith(f":{m.group(2)}") for p in services[m.group(1)]["ports"])
    assert cfg.generation.api_key_env in _environment(services["worker"])
    assert cfg.dedup.index == "redis" and cfg.dedup.redis_url == "redis://redis:6379/0"
    assert str(cfg.output.dir).startswith("/data/")


# ---------------------------------------------------------------- the Compose Specification


def _check_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the Compose Specification's schema it bundles (offline)."""
    exe = Path(sys.executable).with_name("check-jsonschema")
    cmd = [str(exe), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_the_file_and_its_resolved_form_follow_the_compose_spec(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The file as written, and as Compose resolves it with .env.example and the secrets
    set, validate against the Compose Specification; a misspelt key does not."""
    assert (ok := _check_compose_spec(COMPOSE)).returncode == 0, ok.stdout + ok.stderr

    env = {**_env_example(), **_dummy_secrets()}
    resolved = tmp_path / "resolved.yml"
    resolved.write_text(yaml.safe_dump(_interpolate(compose, env)))
    assert (ok := _check_compose_spec(resolved)).returncode == 0, ok.stdout + ok.stderr

    broken = tmp_path / "broken.yml"
    service = next(iter(compose["services"]))
    bad = {**compose, "services": {**compose["services"], service: {
        **compose["services"][service], "restart_policy": "always"}}}  # fmt: skip
    broken.write_text(yaml.safe_dump(bad))
    refused = _check_compose_spec(broken)
    assert refused.returncode != 0 and "restart_policy" in refused.stdout + refused.stderr
