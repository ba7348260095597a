"""infra/docker-compose.yml, read as a file (no Docker daemon here): published ports bind
127.0.0.1, every password or secret is a variable that infra/.env.example documents empty or
`change-me`, and the MLflow service runs the server command of infra.stack."""

from __future__ import annotations

import re

import yaml

from infra import stack
from tests.conftest import REPO

INFRA = REPO / "infra"
VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")  # ${VAR}, ${VAR:-default}, ${VAR:?error}
ONLY_A_VARIABLE = re.compile(rf"^{VARIABLE.pattern}$")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN")
URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^/@\s]+)@")  # variables replaced by tokens first


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


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
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "serve"} <= set(
        services
    )
    assert services["serve"]["command"] == [
        "lensflow", "serve", "--host", "0.0.0.0", "--port", "8000"
    ]  # fmt: skip
    worker = services["prefect-worker"]["command"]
    assert worker[worker.index("--pool") + 1] == "lensflow"


def test_every_published_port_binds_127_0_0_1():
    published = 0
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert published >= 6


def test_every_secret_is_a_variable_documented_empty_or_change_me():
    compose = _compose()
    secrets = _secrets(compose)
    assert len(secrets) >= 8  # the database and MinIO passwords, in several services
    examples = _env_example()
    for where, value in secrets:
        match = ONLY_A_VARIABLE.match(value)
        assert match, f"{where}: {value!r} is not a ${{VARIABLE}}"
        variable = match.group(1)
        assert variable in examples, f"{where}: {variable} is not in infra/.env.example"
        assert examples[variable] in ("", "change-me"), f".env.example sets {variable}"


def test_env_example_documents_every_variable_of_the_compose_file():
    used = set(VARIABLE.findall((INFRA / "docker-compose.yml").read_text()))
    assert used - set(_env_example()) == set()


def test_the_mlflow_service_runs_the_server_command_of_infra_stack():
    service = _compose()["services"]["mlflow"]
    command, env = stack.mlflow_server(
        "STORE", "s3://${MLFLOW_BUCKET:-mlflow}", 5000, host="0.0.0.0",
        allowed_hosts="mlflow:5000,localhost:*,127.0.0.1:*",
    )  # fmt: skip
    store = command.index("--backend-store-uri")
    del command[store : store + 2]  # compose gives it as MLFLOW_BACKEND_STORE_URI: no password
    assert service["command"] == ["python", *command[1:]]
    environment = _environment(service)
    assert environment.items() >= env.items()
    assert environment["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")


def test_the_serve_service_is_healthy_only_once_ready():
    healthcheck = _compose()["services"]["serve"]["healthcheck"]
    assert "/ready" in " ".join(healthcheck["test"])
