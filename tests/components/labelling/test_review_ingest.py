"""The review queue and ingest on real (tiny) data: the Label Studio import file, answers read
from a Label Studio export, relabels as overrides prepare applies, new images copied, the
audit, `dvc add`, bad answers refused whole, an interrupted ingest resumed; and the round trip
against a real Label Studio server (skipped where its venv is absent)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import main
from components.core import config, paths
from components.core.errors import UserError
from components.data import prepare, prepared
from components.labelling import ingest, review
from tests.components.labelling.conftest import digests

ISSUES = [  # what lensflow labels writes, for the queue
    {"path": "gradient_h/odd-1.png", "split": "train", "given": "gradient_h",
     "suggested": "checker_2", "score": 0.01, "suggested_probability": 0.9},
    {"path": "checker_2/odd-0.png", "split": "train", "given": "checker_2",
     "suggested": "circle_large", "score": 0.02, "suggested_probability": 0.8},
]  # fmt: skip


def _write_issues() -> None:
    paths.REPORTS.mkdir(exist_ok=True)
    with paths.LABEL_ISSUES.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ISSUES[0]))
        writer.writeheader()
        writer.writerows(ISSUES)


def _dvc_repo(root: Path) -> None:
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/mini"], check=True)


def _dvc_md5() -> str:
    return yaml.safe_load(Path("data/raw/mini.dvc").read_text())["outs"][0]["md5"]


def _accept_all(tasks: list[dict], who: str = "reviewer@example.com") -> list[dict]:
    """A Label Studio JSON export in which a person accepted every pre-annotation."""
    return [
        {"id": i, "data": task["data"], "annotations": [{
            "result": task["predictions"][0]["result"], "completed_by": {"email": who},
            "updated_at": "2026-12-06T07:00:00Z", "was_cancelled": False}]}
        for i, task in enumerate(tasks, start=1)
    ]  # fmt: skip


def test_export_import_ingest_without_a_server(mini, tmp_path):
    root = mini["root"] / "data/raw/mini"
    batch = tmp_path / "batch"  # a monitored batch: one image monitoring flagged
    batch.mkdir()
    shutil.copy(root / "circle_large/circle_large-03.png", batch / "new.png")
    _write_monitoring(batch)
    _write_issues()
    _dvc_repo(mini["root"])
    before, md5 = digests(root), _dvc_md5()

    assert main(["review", "export", "--no-server"]) == 0
    tasks = json.loads(review.TASKS.read_text())
    sources = [t["data"]["source"] for t in tasks]
    assert sources[:3] == ["suspect", "suspect", "monitoring"] and sources.count("random") == 3
    assert tasks[0]["predictions"][0]["result"][0]["value"] == {"choices": ["checker_2"]}
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=data/raw/mini/gradient_h/odd-1.png"

    # bad answers: one line per problem, and nothing is applied
    bad = tmp_path / "bad.csv"
    bad.write_text("path,kind,label\nchecker_2/gone.png,relabel,circle_large\n"
                   "checker_2/odd-0.png,relabel,triangle\n")  # fmt: skip
    with pytest.raises(UserError) as refused:
        ingest.run(config.load("params.yaml"), bad)
    lines = str(refused.value).splitlines()
    assert lines[1].endswith("checker_2/gone.png is not an image of data/raw/mini")
    assert "unknown class 'triangle'" in lines[2] and len(lines) == 3
    assert digests(root) == before and _dvc_md5() == md5

    export = tmp_path / "export.json"  # a team without a server: Label Studio's JSON export
    export.write_text(json.dumps(_accept_all(tasks)))
    assert main(["review", "import", "--file", str(export)]) == 0
    # an ingest interrupted after writing its plan, before any change: the next one resumes it
    cfg = config.load("params.yaml")
    answers = ingest._read_answers(review.ANSWERS)
    paths.write_json(
        ingest.JOURNAL, ingest._plan(root, sorted(before_classes(root)), answers, review.ANSWERS)
    )
    result = ingest.run(cfg, review.ANSWERS)
    assert result.resumed and (result.relabelled, result.added) == (0, 0)
    assert not ingest.JOURNAL.exists()

    after = digests(root)
    assert {k: v for k, v in after.items() if k in before and k != "labels.csv"} == {
        k: v for k, v in before.items() if k != "labels.csv"
    }  # every raw image byte-identical
    assert after["circle_large/new.png"] == before["circle_large/circle_large-03.png"]
    overrides = (root / "labels.csv").read_text().splitlines()
    assert overrides == ["path,label", "checker_2/odd-0.png,circle_large",
                         "gradient_h/odd-1.png,checker_2"]  # fmt: skip
    with (root / "ingest_audit.csv").open() as f:
        audit = list(csv.DictReader(f))
    assert len(audit) == 3 and {row["decided_by"] for row in audit} == {"reviewer@example.com"}
    assert _dvc_md5() != md5 and result.data_md5 == _dvc_md5()

    prepare.run(cfg)  # the relabels apply; the files stayed where they were
    manifest = prepared.load_manifest(["path", "label"]).set_index("path")["label"]
    assert manifest["checker_2/odd-0.png"] == "circle_large"
    assert manifest["circle_large/new.png"] == "circle_large"
    assert json.loads(paths.META.read_text())["relabelled"] == 2
    assert main(["ingest"]) == 0  # the same answers again: nothing changes
    assert len(list(csv.DictReader((root / "ingest_audit.csv").open()))) == 3


def before_classes(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.is_dir()]


def _write_monitoring(batch: Path) -> None:
    paths.write_json(paths.MONITORING_REPORT, {"batch": {"path": str(batch)}})
    with paths.MONITORING_IMAGES.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "predicted", "confidence", "flagged"])
        writer.writerow(["new.png", "", "circle_large", "0.4", "True"])


def test_round_trip_through_label_studio(label_studio, prefect_server, mini, monkeypatch, capsys):
    """After the file round trip above: export to a real server, a reviewer's script answers
    through the REST API, accepting every suggestion but one, which keeps its folder's label
    (the file round trip already applied every suggestion: accepting them all again would
    change nothing), import, ingest: `dvc status` shows the data changed, `lensflow run`
    trains on it, and the new version's lineage names its hash; every raw image stays
    byte-identical. lensflow talks to the server with a personal access token (Label Studio
    1.23's default), the reviewer's script with the legacy token."""
    from components.labelling import label_studio as ls

    if not Path(".dvc").is_dir():  # the test above makes the repository; run alone, this does
        _dvc_repo(mini["root"])
    # the pipeline's first stage, recorded as it is now: `dvc status` compares against it
    Path("dvc.yaml").write_text(PREPARE_STAGE)
    _dvc("commit", "--force")
    monkeypatch.setenv(ls.KEY_ENV, label_studio.personal_token)
    monkeypatch.setenv(review.DOCUMENT_ROOT_ENV, str(mini["root"]))
    params = config.load("params.yaml").as_dict()
    params["review"]["url"] = label_studio.url
    params["train"]["epochs"] = 1  # in params.yaml, not --set: the run then records dvc.lock
    Path("params.yaml").write_text(yaml.safe_dump(params))
    _write_issues()
    root = mini["root"] / "data/raw/mini"
    before, md5 = digests(root), _dvc_md5()

    assert main(["review", "export"]) == 0  # 1. export
    client = ls.Client(label_studio.url, label_studio.token)  # 2. a reviewer's script
    project = client.find_project("lensflow review")
    expired = ls.Client(label_studio.url, label_studio.personal_token)
    expired.auth = "Bearer expired"  # an access token past its minutes: traded again
    assert expired.find_project("lensflow review") == project
    tasks = client.tasks(project)
    assert len(tasks) == len(json.loads(review.TASKS.read_text()))
    for task in tasks:
        answer = task["predictions"][0]["result"]
        if task["data"]["path"] == "gradient_h/odd-1.png":
            answer = [review.choice("gradient_h")]
        client.annotate(task["id"], answer)
    assert main(["review", "export"]) == 0  # again: the project is updated, no task doubled
    assert len(client.tasks(project)) == len(tasks)

    assert main(["review", "import"]) == 0  # 3. import
    with review.ANSWERS.open() as f:
        answers = {a["path"]: a for a in csv.DictReader(f)}
    assert answers["gradient_h/odd-1.png"]["label"] == "gradient_h"
    assert answers["checker_2/odd-0.png"]["who"] == "reviewer@example.com"
    assert main(["ingest"]) == 0  # 4. ingest
    assert "gradient_h/odd-1.png" not in (root / "labels.csv").read_text()
    new_md5 = _dvc_md5()
    assert new_md5 != md5
    status = _dvc("status")  # 5. the pipeline sees new data ("modified": it was recorded)
    assert "changed deps" in status and "modified:           data/raw" in status, status

    with prefect_server.settings():  # 6. the next run
        assert main(["run"]) == 0
    manifest = prepared.load_manifest(["path", "label"]).set_index("path")["label"]
    assert manifest["gradient_h/odd-1.png"] == "gradient_h"  # trained on the answers
    assert "up to date" in _dvc("status")  # the run recorded what it trained on
    registered = json.loads(paths.REGISTRY_REPORT.read_text())
    capsys.readouterr()
    assert main(["lineage", f"{registered['name']}/{registered['version']}"]) == 0  # 7.
    assert json.loads(capsys.readouterr().out)["data.md5"] == new_md5

    after = digests(root)  # relabels are overrides: every raw image byte-identical
    assert {k: after[k] for k in before if k not in OVERRIDE_FILES} == {
        k: v for k, v in before.items() if k not in OVERRIDE_FILES
    }


OVERRIDE_FILES = ("labels.csv", "ingest_audit.csv")
PREPARE_STAGE = """stages:
  prepare:
    cmd: lensflow stage prepare
    deps: [data/raw]
    params: [seed, data, prepare]
    outs: [data/prepared]
"""


def _dvc(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], capture_output=True, text=True, check=True
    )
    return done.stdout + done.stderr
