"""infra/docker-compose.yml, read as a file (no Docker daemon here): only the proxy publishes
a port (and PostgreSQL with the TLS override), no service but the setup job gets MinIO's root
keys, `serve` mounts nothing writable, every long-running service has a healthcheck, every
password or secret is a variable that infra/.env.example documents empty or `change-me`, the
MLflow service runs the server command of infra.stack with its accounts, and the proxy's
configuration gets every value it needs. Debian's docker-compose parses it where installed."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess

import pytest
import yaml

from infra import accounts, stack
from tests.conftest import REPO

INFRA = REPO / "infra"
VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")  # ${VAR}, ${VAR:-default}, ${VAR:?error}
ONLY_A_VARIABLE = re.compile(rf"^{VARIABLE.pattern}$")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING")
ROOT_KEYS = re.compile(r"\$\{MINIO_ROOT_(USER|PASSWORD)\b")
ONE_SHOT = {"minio-setup", "mlflow-setup"}  # run once; services wait for them to complete
URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^/@\s]+)@")  # variables replaced by tokens first


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(entry.partition("=")[::2] for entry in environment)
    return {key: str(value) for key, value in environment.items()}


def _url_passwords(text: str) -> list[str]:
    """The passwords of the URLs in `text`, ${VARIABLES} and all."""
    variables = []

    def token(match: re.Match) -> str:
        variables.append(match.group(0))
        return f"VARIABLE{len(variables) - 1}X"

    tokens = VARIABLE.sub(token, text)
    restore = re.compile(r"VARIABLE(\d+)X")
    return [restore.sub(lambda m: variables[int(m[1])], p) for p in URL_PASSWORD.findall(tokens)]


def _secrets(compose: dict) -> list[tuple[str, str]]:
    """(where, text) of every value that holds a password or secret: a variable whose name
    says so, or the password in a URL."""
    found = []
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_KEY.search(key):
                found.append((f"{name}.environment.{key}", value))
            found += [(f"{name}.environment.{key} (URL)", p) for p in _url_passwords(value)]
        for part in service.get("command") or []:
            found += [(f"{name}.command (URL)", p) for p in _url_passwords(str(part))]
    return found


def test_the_stack_has_every_service():
    services = _compose()["services"]
    assert set(services) == {
        "postgres", "minio", "minio-setup", "mlflow", "mlflow-setup", "prefect-server",
        "prefect-worker", "serve", "proxy",
    }  # fmt: skip
    assert services["serve"]["command"] == [
        "lensflow", "serve", "--host", "0.0.0.0", "--port", "8000"
    ]  # fmt: skip
    worker = services["prefect-worker"]["command"]
    assert worker[worker.index("--pool") + 1] == "lensflow"
    assert "name" not in _compose()  # Debian's docker-compose 1.29 refuses a top-level name


def test_only_the_proxy_publishes_a_port_and_postgres_only_with_tls():
    published = {name: s["ports"] for name, s in _compose()["services"].items() if "ports" in s}
    assert published == {"proxy": ["${PROXY_ADDRESS:-127.0.0.1}:${PROXY_PORT:-443}:443"]}
    override = _compose("docker-compose.postgres-tls.yml")["services"]
    assert list(override) == ["postgres"] and override["postgres"]["ports"]
    command = " ".join(override["postgres"]["command"])
    assert "ssl=on" in command and "password_encryption=scram-sha-256" in command
    hba = [line.split() for line in (INFRA / "postgres-tls-hba.conf").read_text().splitlines()]
    rules = [fields for fields in hba if fields and not fields[0].startswith("#")]
    assert rules == [["local", "all", "all", "trust"], ["hostssl", "all", "all", "all",
                                                         "scram-sha-256"]]  # fmt: skip


def _text(service: dict) -> str:
    return yaml.safe_dump({k: service.get(k) for k in ("environment", "command", "entrypoint")})


def test_no_service_but_the_setup_job_gets_minio_root_keys():
    services = _compose()["services"]
    holders = {name for name, service in services.items() if ROOT_KEYS.search(_text(service))}
    assert holders == {"minio", "minio-setup"}  # minio: the server that defines them
    keys = {name: _environment(s).get("AWS_ACCESS_KEY_ID") for name, s in services.items()}
    assert keys["mlflow"] == "${MINIO_MLFLOW_USER:-mlflow-server}"
    assert keys["prefect-worker"] == "${MINIO_DVC_USER:-dvc-pipeline}"
    assert keys["serve"] is None  # its models come through MLflow
    # each service user's policy names its own bucket only
    script = (INFRA / "minio-setup.sh").read_text()
    assert 'bucket_policy lensflow-mlflow "$MLFLOW_BUCKET"' in script
    assert 'bucket_policy lensflow-dvc "$DVC_BUCKET"' in script
    assert '"arn:aws:s3:::$2"' in script and '"arn:aws:s3:::$2/*"' in script
    assert "arn:aws:s3:::*" not in script
    assert 'attach lensflow lensflow-mlflow --user "$MINIO_MLFLOW_USER"' in script
    assert 'attach lensflow lensflow-dvc --user "$MINIO_DVC_USER"' in script


def test_serve_mounts_nothing_writable_and_the_worker_runs_where_its_project_is():
    services = _compose()["services"]
    for volume in services["serve"]["volumes"]:
        assert volume.endswith(":ro"), volume
    assert "tmpfs" not in services["serve"]
    worker = services["prefect-worker"]
    [project] = worker["volumes"]
    # `lensflow deploy` in this container records this folder: it exists where runs run
    assert project.rsplit(":", 1)[1] == worker["working_dir"] == "/project"
    assert "AWS_ACCESS_KEY_ID" not in _environment(services["mlflow-setup"])


def test_every_long_running_service_has_a_healthcheck():
    for name, service in _compose()["services"].items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
        else:
            assert service["healthcheck"]["test"], name
    done = "service_completed_successfully"
    waits = {
        name: {d for d, c in s.get("depends_on", {}).items() if c["condition"] == done}
        for name, s in _compose()["services"].items()
    }
    assert waits["mlflow"] == {"minio-setup"}
    assert waits["prefect-worker"] == waits["serve"] == {"mlflow-setup"}


def test_every_secret_is_a_variable_documented_empty_or_change_me():
    compose = _compose()
    secrets = _secrets(compose)
    assert len(secrets) >= 20  # database, MinIO, MLflow and Prefect secrets, in many services
    examples = _env_example()
    for where, value in secrets:
        match = ONLY_A_VARIABLE.match(value)
        assert match, f"{where}: {value!r} is not a ${{VARIABLE}}"
        variable = match.group(1)
        assert variable in examples, f"{where}: {variable} is not in infra/.env.example"
        assert examples[variable] in ("", "change-me"), f".env.example sets {variable}"


def test_env_example_documents_every_variable_of_the_compose_files():
    used = set()
    for name in ("docker-compose.yml", "docker-compose.postgres-tls.yml"):
        used |= set(VARIABLE.findall((INFRA / name).read_text()))
    assert used - set(_env_example()) == set()


def test_the_mlflow_service_runs_the_server_command_of_infra_stack_with_accounts():
    services = _compose()["services"]
    service = services["mlflow"]
    name = "${MLFLOW_HOSTNAME:-mlflow.lensflow.internal}"
    command, env = stack.mlflow_server(
        "STORE", "s3://${MLFLOW_BUCKET:-mlflow}", 5000, host="0.0.0.0",
        allowed_hosts=f"mlflow:5000,{name},{name}:*,localhost:*,127.0.0.1:*", auth=True,
    )  # fmt: skip
    store = command.index("--backend-store-uri")
    del command[store : store + 2]  # compose gives it as MLFLOW_BACKEND_STORE_URI: no password
    assert service["command"] == ["python", *command[1:]]
    environment = _environment(service)
    assert environment.items() >= env.items()
    assert environment["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    config = configparser.ConfigParser()
    config.read(INFRA / "mlflow-auth.ini")
    settings = dict(config["mlflow"])
    assert settings["default_permission"] == "NO_PERMISSIONS"
    assert settings["auth_cache_ttl_seconds"] == accounts.AUTH_CACHE_TTL_S
    assert service["command"][service["command"].index("--workers") + 1] == "1"  # see there
    assert "admin_password" not in settings and "@" not in settings["database_uri"]
    assert settings["database_uri"].endswith("/mlflow_auth")
    assert "CREATE DATABASE mlflow_auth;" in (INFRA / "postgres-init.sql").read_text()
    users = {
        s: _environment(services[s]).get("MLFLOW_TRACKING_USERNAME")
        for s in ("prefect-worker", "serve", "mlflow-setup")
    }
    assert users == {"prefect-worker": "pipeline", "serve": "serving", "mlflow-setup": "admin"}


def test_the_serve_service_is_healthy_only_once_ready():
    healthcheck = _compose()["services"]["serve"]["healthcheck"]
    assert "/ready" in " ".join(healthcheck["test"])


def test_the_proxy_gets_every_value_of_its_configuration_and_does_not_wait_for_serve():
    from components.core import config

    proxy = _compose()["services"]["proxy"]
    template = (INFRA / "nginx/lensflow.conf.template").read_text()
    needed = set(re.findall(r"\$\{(\w+)\}", template))
    assert needed and needed <= set(_environment(proxy))
    assert "serve" not in proxy["depends_on"]  # it answers 502/503 until serve is ready
    body = _environment(proxy)["SERVE_MAX_BODY"]
    size = int(re.search(r":-(\d+)m\}", body)[1]) * 2**20
    assert size >= config.from_dict({}).serve.max_upload_bytes
    assert (
        "./nginx/lensflow.conf.template:/etc/nginx/templates/lensflow.conf.template:ro"
        in (proxy["volumes"])
    )


@pytest.mark.parametrize("override", [[], ["-f", "docker-compose.postgres-tls.yml"]])
def test_debian_docker_compose_parses_the_stack(override, tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    env_file = tmp_path / ".env"
    env_file.write_text(
        "".join(f"{key}={value or 'x1234567'}\n" for key, value in _env_example().items())
    )
    result = subprocess.run(
        [binary, "--env-file", str(env_file), "-f", "docker-compose.yml", *override, "config",
         "-q"], cwd=INFRA, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
