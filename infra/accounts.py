"""MLflow accounts on a tracking server with its built-in authentication
(`mlflow server --app-name basic-auth`): the admin, and accounts of two roles (ROLES), made,
granted and given new passwords through the server's REST API by the admin. Passwords are
generated here and kept in files only their user can read (`.lensflow/auth/<account>`).

Permissions are per experiment and per registered model; an account has none beyond its
grants (the server's default_permission is NO_PERMISSIONS, see `write_config`).
"""

from __future__ import annotations

import os
import secrets
from configparser import ConfigParser
from pathlib import Path

from components.core.errors import UserError

ADMIN = "admin"
USERS = "/api/2.0/mlflow/users/"
PERMISSIONS = "/api/3.0/mlflow/users/permissions/"
EXPERIMENTS = "/api/2.0/mlflow/experiments/"
AUTH_DIR = Path(".lensflow/auth")  # a project's credentials: one file per account, mode 0600
MODEL_TRAINING_TAG = ("mlflow.experimentKind", "custom_model_development")  # core.tracking's
# MLflow checks the password of every request with a deliberately slow hash (PBKDF2): about
# 1 s per request on a busy 2-core machine, minutes for one `lensflow run`. Its cache keeps a
# checked (user, password) for this long in the server's process; a password changed or an
# account deleted through the API leaves the cache at once on the worker that handled it, and
# lensflow's servers run one worker (--workers 1), so nothing stale is ever accepted.
AUTH_CACHE_TTL_S = "600"
ROLES = {
    "pipeline": "log runs in every experiment, register versions, move aliases, take and "
    "break the promotion lock (EDIT on experiments, MANAGE on registered models)",
    "serving": "read the registered model and the experiment its versions' runs are in "
    "(READ on both): lensflow serve, predict, evaluate --model models:/…",
}


def generate() -> str:
    """A new password: 32 URL-safe characters (they go into URLs and HTTP headers as they are)."""
    return secrets.token_urlsafe(24)


def write_secret(path: Path, text: str) -> Path:
    """`text` in `path`, readable by this user only (0600, its folder 0700), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    os.replace(partial, path)
    return path


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the password ({exc.strerror})") from None


def secret(path: Path) -> str:
    """The secret in `path`, generated and written (0600) the first time."""
    return read_secret(path) if path.exists() else write_secret(path, generate()).read_text()


def write_config(path: Path, database_uri: str) -> Path:
    """The auth app's configuration (MLFLOW_AUTH_CONFIG_PATH): users in `database_uri`, no
    permission without a grant, the admin named ADMIN, checked passwords cached (see
    AUTH_CACHE_TTL_S). No password in it: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD on
    the server's first start (`server_env`)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = ConfigParser()
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": database_uri,
        "admin_username": ADMIN,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "auth_cache_ttl_seconds": AUTH_CACHE_TTL_S,
    }
    with path.open("w") as out:
        config.write(out)
    return path


def server_env(config: Path, admin_password: str, secret_key: str) -> dict[str, str]:
    """The environment of `mlflow server --app-name basic-auth`."""
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,  # read once: when the admin is created
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,  # signs the UI's sessions and CSRF tokens
    }


class Admin:
    """The server's account API, as the account in `creds` (an MlflowHostCreds: the admin's
    for everything but a password change of one's own)."""

    def __init__(self, creds):
        self.creds = creds

    @classmethod
    def login(cls, url: str, username: str = ADMIN, password: str | None = None) -> Admin:
        """As `username`/`password`, or (None) as the environment's MLflow account
        (MLFLOW_TRACKING_USERNAME / _PASSWORD), with its TLS settings."""
        from mlflow.utils.credentials import get_default_host_creds

        creds = get_default_host_creds(url)
        if password is not None:
            creds.username, creds.password = username, password
        if not creds.username:
            raise UserError(
                "no MLflow account: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                f"(the {ADMIN} account's, from its file) and MLFLOW_TRACKING_URI"
            )
        return cls(creds)

    def request(self, endpoint: str, method: str = "POST", **body):
        """The server's answer, whatever its status."""
        from mlflow.utils.rest_utils import http_request

        keyword = "params" if method == "GET" else "json"
        return http_request(self.creds, endpoint, method, max_retries=2, **{keyword: body})

    def call(self, endpoint: str, method: str = "POST", **body) -> dict:
        """The server's JSON answer; a refusal or an error is a UserError."""
        return self._checked(self.request(endpoint, method, **body), endpoint)

    def _checked(self, answer, endpoint: str) -> dict:
        if answer.status_code in (401, 403):
            raise UserError(
                f"MLflow {self.creds.host}: account {self.creds.username!r} may not call "
                f"{endpoint} (HTTP {answer.status_code}); accounts are made and changed by "
                f"the {ADMIN!r} account"
            )
        if answer.status_code >= 400:
            raise UserError(f"MLflow {self.creds.host}{endpoint}: {answer.text[:300]}")
        return answer.json() if answer.content else {}

    def exists(self, username: str) -> bool:
        answer = self.request(USERS + "get", "GET", username=username)
        if answer.status_code == 404:
            return False
        self._checked(answer, USERS + "get")
        return True

    def set_password(self, username: str, password: str) -> None:
        """Create the account, or give it this password."""
        if not self.exists(username):
            self.call(USERS + "create", username=username, password=password)
            return
        body = {"username": username, "password": password}
        if username == self.creds.username:  # one's own: MLflow asks for the current one
            body["current_password"] = self.creds.password
        self.call(USERS + "update-password", "PATCH", **body)
        if username == self.creds.username:
            self.creds.password = password

    def grant(self, username: str, resource_type: str, resource_id: str, level: str) -> None:
        """The account's permission on one resource ("*": all of that type), replacing any."""
        where = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        self.request(PERMISSIONS + "revoke", **where)  # none yet: a 404, fine
        self.call(PERMISSIONS + "grant", **where, permission=level)

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, made (as lensflow makes it) when missing."""
        found = self.request(EXPERIMENTS + "get-by-name", "GET", experiment_name=name)
        if found.status_code == 200:
            return found.json()["experiment"]["experiment_id"]
        key, value = MODEL_TRAINING_TAG
        made = self.call(EXPERIMENTS + "create", name=name, tags=[{"key": key, "value": value}])
        return made["experiment_id"]

    def grant_role(self, username: str, role: str, experiment: str, model: str) -> None:
        """The grants of `role` (ROLES): for `serving`, on experiment `experiment` (made when
        missing) and registered model `model` only."""
        if role == "pipeline":
            self.grant(username, "experiment", "*", "EDIT")
            self.grant(username, "registered_model", "*", "MANAGE")
        elif role == "serving":
            self.grant(username, "experiment", self.experiment_id(experiment), "READ")
            self.grant(username, "registered_model", model, "READ")
        else:
            raise UserError(f"role {role!r}: expected one of {', '.join(ROLES)}")


def bootstrap(admin: Admin, passwords: dict[str, str], experiment: str, model: str) -> None:
    """The accounts `pipeline` and `serving` (named after their roles) with these passwords
    and their grants: what `lensflow stack up --auth` and a new team server start with."""
    for role in ROLES:
        admin.set_password(role, passwords[role])
        admin.grant_role(role, role, experiment, model)


def main() -> int:
    """`python -m infra.accounts`, the team stack's one-shot job (docker-compose.yml, service
    mlflow-setup), in the project folder: as the admin (MLFLOW_TRACKING_USERNAME / _PASSWORD),
    the accounts `pipeline` and `serving` with the passwords of MLFLOW_PIPELINE_PASSWORD and
    MLFLOW_SERVING_PASSWORD, granted for params.yaml's experiment and registered model."""
    import sys

    from components.core import config, tracking

    try:
        cfg = config.load("params.yaml")
        passwords = {}
        for role in ROLES:
            variable = f"MLFLOW_{role.upper()}_PASSWORD"
            if not os.environ.get(variable):
                raise UserError(f"{variable} is not set: the password of account {role!r}")
            passwords[role] = os.environ[variable]
        admin = Admin.login(tracking.tracking_uri())
        bootstrap(admin, passwords, cfg.tracking.experiment, cfg.registry.model_name)
    except UserError as exc:
        print(f"lensflow accounts: error: {exc}", file=sys.stderr)
        return 2
    print(f"accounts {', '.join(ROLES)}: ready on {tracking.shown_uri()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
