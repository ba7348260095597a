"""A Label Studio server over its REST API (no SDK: it resolves here only at an old version,
with heavy extras). The API key comes from the environment (`LABEL_STUDIO_API_KEY`): a
personal access token (a JWT, exchanged for a short-lived access token, and again whenever
that expires) or a legacy token."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from components.core.credentials import redact
from components.core.errors import UserError

KEY_ENV = "LABEL_STUDIO_API_KEY"
URL_ENV = "LABEL_STUDIO_URL"
PAGE = 100


class Client:
    def __init__(self, url: str, key: str, timeout: float = 30.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.auth = f"Token {key}"
        self.personal_token = key if key.count(".") == 2 else None  # a JWT, not a legacy token
        if self.personal_token:
            self._refresh()

    def _refresh(self) -> None:
        """Trade the personal access token for an access token (valid minutes only)."""
        body = {"refresh": self.personal_token}
        access = self._call("POST", "/api/token/refresh", body, auth=False)
        self.auth = f"Bearer {access['access']}"

    @classmethod
    def from_env(cls, url: str) -> Client:
        key = os.environ.get(KEY_ENV)
        if not key:
            raise UserError(
                f"{KEY_ENV} is not set: copy the token from Label Studio (Account & Settings) "
                "into it, or work without a server (review/tasks.json, --file)"
            )
        return cls(os.environ.get(URL_ENV) or url, key)

    def find_project(self, title: str) -> int | None:
        for project in self._all("/api/projects", "results"):
            if project.get("title") == title:
                return int(project["id"])
        return None

    def project(self, title: str, label_config: str) -> int:
        """The id of the project titled `title`, created or given `label_config`."""
        found = self.find_project(title)
        body = {"title": title, "label_config": label_config}
        if found is None:
            return int(self._call("POST", "/api/projects", body)["id"])
        self._call("PATCH", f"/api/projects/{found}", {"label_config": label_config})
        return found

    def serve_folder(self, project: int, folder: str) -> str:
        """Let the project show the images under `folder` (an absolute path inside Label
        Studio's LOCAL_FILES_DOCUMENT_ROOT): a local-files storage of the project on it, made
        once and never synced (tasks come from export). Returns '' or why it could not."""
        storages = self._call("GET", f"/api/storages/localfiles?project={project}")
        if any(folder.startswith(s.get("path") or "//") for s in storages):
            return ""
        body = {"project": project, "path": folder, "title": "lensflow", "use_blob_urls": False}
        try:
            self._call("POST", "/api/storages/localfiles", body)
        except UserError as exc:  # local files not served: tasks work, images do not show
            return f"images will not show: {exc} (start it with make label-studio)"
        return ""

    def tasks(self, project: int) -> list[dict]:
        return self._all(f"/api/tasks?project={project}&fields=all", "tasks")

    def add_tasks(self, project: int, tasks: list[dict]) -> int:
        """Import the tasks whose image path the project does not hold yet; returns how many."""
        have = {task["data"].get("path") for task in self.tasks(project)}
        new = [task for task in tasks if task["data"]["path"] not in have]
        if new:
            self._call("POST", f"/api/projects/{project}/import", new)
        return len(new)

    def export(self, project: int | None) -> list[dict]:
        """Every task of the project with its annotations (Label Studio's JSON export)."""
        if project is None:
            raise UserError(f"{self.url}: no such project: run lensflow review export first")
        exported = self._call("GET", f"/api/projects/{project}/export?exportType=JSON")
        users: dict[int, dict] = {}
        for task in exported:  # who annotated: the export may name a user by id only
            for annotation in task.get("annotations") or []:
                who = annotation.get("completed_by")
                if isinstance(who, int):
                    if who not in users:
                        users[who] = self._call("GET", f"/api/users/{who}")
                    annotation["completed_by"] = users[who]
        return exported

    def annotate(self, task: int, result: list[dict]) -> dict:
        return self._call("POST", f"/api/tasks/{task}/annotations", {"result": result})

    def _all(self, path: str, key: str) -> list[dict]:
        """Every item of a paginated list (a bare list, or {key: [...]} page by page)."""
        found, page = [], 1
        while True:
            sep = "&" if "?" in path else "?"
            try:
                answer = self._call("GET", f"{path}{sep}page={page}&page_size={PAGE}")
            except UserError as exc:
                if page > 1 and "404" in str(exc):  # past the last page
                    return found
                raise
            items = answer if isinstance(answer, list) else answer.get(key) or []
            found += items
            total = None if isinstance(answer, list) else answer.get("total") or answer.get("count")
            if isinstance(answer, list) or len(items) < PAGE or (total and len(found) >= total):
                return found
            page += 1

    def _call(self, method: str, path: str, body=None, auth: bool = True, again: bool = True):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = self.auth
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and auth and again and self.personal_token:  # access expired
                self._refresh()
                return self._call(method, path, body, auth, again=False)
            detail = exc.read().decode(errors="replace")[:300]
            raise UserError(
                f"Label Studio {self.url}: {method} {path.split('?')[0]} answered {exc.code}: "
                f"{redact(detail)}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"Label Studio {self.url} is not answering ({exc}): start it (make label-studio)"
                " or work without a server (review/tasks.json, --file)"
            ) from None
        return json.loads(text) if text else {}
