"""Live rollouts against a real `lensflow serve` (canary, 2 workers) on the package's tiny
registry, with labelled traffic from the test split and the controller's passes run here:

- a clearly worse challenger (version 4: the good model's ONNX with its class names shifted
  by one, so it names the wrong class for every image): rolled back, never promoted;
- a clearly better one (version 3, the good model, against version 4 as champion): ramped
  5 → 100 % and promoted through the promotion log (action `rollout`);
- an identical one (version 1 against version 3): nothing decided until rollout.max_labels.

Along the way: every answer names its version and the model that gave it, a client key keeps
its model, /feedback answers 404/400 and ignores duplicates (across workers), /metrics counts
pairs, and after SIGTERM every answered request's pair is in the log (across the hot swaps the
rollouts made). Training a model on flipped labels would cost a training run; the shifted
class names give a served model that is wrong in the same way as a badly trained one.
"""

from __future__ import annotations

import json
import signal
from functools import partial
from pathlib import Path

import mlflow
import onnx
import pandas as pd
import pytest

from cli.main import main
from components.core import config, paths
from components.release import promotion_log, registry, rollout, rollout_log
from tests.servers import free_port
from tests.serving import test_server
from tests.serving.conftest import _as_another_checkpoint, request, start_server

SERVE = ("serve.rollout=canary", "serve.poll_seconds=0.2", "serve.rollout_flush_seconds=2")
CONTROL = ("rollout.min_pairs=8", "rollout.ramp=[0.5,1.0]", "rollout.ramp_labels=6",
           "rollout.max_labels=60", "promote.lease_s=10")  # fmt: skip
PNG = {"Content-Type": "image/png"}
_until = partial(test_server._until, seconds=60)  # two workers, each following two aliases


@pytest.fixture(scope="module")
def rollout_server(registered, tmp_path_factory):
    name, cfg = registered["name"], registered["cfg"]
    _register_shifted(cfg)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "champion", "1")
    log_dir = tmp_path_factory.mktemp("pair-log")
    settings = (*SERVE, f"serve.rollout_dir={log_dir}")
    control = config.load("params.yaml", ["train.epochs=2", *settings, *CONTROL])
    port = free_port()
    process = start_server(registered["root"], port, *settings, "serve.workers=2")
    yield {**registered, "port": port, "process": process, "log": Path(log_dir),
           "control": control, "traffic": _test_split(), "answered": [], "labelled": 0}  # fmt: skip
    if process.poll() is None:
        process.kill()
    process.wait()
    client.set_registered_model_alias(name, "champion", "1")  # as the other modules expect
    if promotion_log._alias(name, "challenger"):
        client.delete_registered_model_alias(name, "challenger")


def _register_shifted(cfg) -> None:
    """Version 4: version 1's weights (its golden check passes), class names shifted by one."""
    good = paths.ONNX.read_bytes()
    proto = onnx.load(paths.ONNX)
    entry = next(p for p in proto.metadata_props if p.key == "classes")
    classes = json.loads(entry.value)
    entry.value = json.dumps(classes[1:] + classes[:1])
    onnx.save(proto, paths.ONNX)
    _as_another_checkpoint(4)
    try:
        assert registry.run(cfg).version == "4"
    finally:
        paths.ONNX.write_bytes(good)


def _test_split() -> list[tuple[bytes, str]]:
    manifest = pd.read_parquet(paths.MANIFEST, columns=["path", "label", "split"])
    test = manifest[manifest["split"] == "test"]
    root = Path("data/raw/shapes")
    pairs = zip(test["path"], test["label"], strict=True)
    return [((root / path).read_bytes(), label) for path, label in pairs]


def _serve_traffic(server, n: int, version: str) -> list[dict]:
    """n requests from the test split, 8 client keys; every answer checked and kept."""
    answers = []
    for i in range(n):
        png, label = server["traffic"][i % len(server["traffic"])]
        status, body, _ = request(
            server["port"], "POST", "/predict", png, {**PNG, "X-Client-Key": f"client-{i % 8}"}
        )
        assert status == 200, body
        by = body["answered_by"]
        assert (body["model_version"] == version) == (by == "challenger")
        answers.append({"id": body["request_id"], "label": label, "client": i % 8, "by": by})
    server["answered"].extend(answers)
    return answers


def _both_workers_follow(port: int, challenger: str | None) -> None:
    """/model of several connections (the kernel spreads them over the 2 workers) agree."""

    def agreed():
        seen = [request(port, "GET", "/model")[1]["rollout"]["challenger"] for _ in range(12)]
        return all(version == challenger for version in seen)

    _until(agreed, what=f"both workers following @challenger = {challenger}")


def _label(server, answers: list[dict]) -> dict:
    items = [{"request_id": a["id"], "label": a["label"]} for a in answers]
    status, body, _ = request(server["port"], "POST", "/feedback", json.dumps(items).encode(),
                              {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, body
    server["labelled"] += body["recorded"]
    return body


def _step(server, cfg) -> dict:
    """One controller pass once the log holds every label sent and its pair (a worker
    writes its pairs every serve.rollout_flush_seconds)."""
    _until(lambda: rollout.status(cfg)["evidence"]["labelled"] >= server["labelled"],
           what="the labelled pairs in the log")  # fmt: skip
    return rollout.step(cfg)


def _until_decided(server, cfg, version: str, rounds: int = 6) -> dict:
    """Controller passes, with 8 more labelled requests before each while it runs."""
    now = _step(server, cfg)
    for _ in range(rounds):
        if now["state"] != "running":
            return now
        _label(server, _serve_traffic(server, 8, version))
        now = _step(server, cfg)
    return now


def test_a_worse_challenger_is_rolled_back_and_feedback_is_checked(rollout_server):
    server, cfg, name = rollout_server, rollout_server["control"], rollout_server["name"]
    port = server["port"]
    started, server["labelled"] = rollout.start(cfg, "4", "the shifted model"), 0
    assert started["state"] == "running" and started["challenger"] == "4"
    _both_workers_follow(port, "4")
    answers = _serve_traffic(server, 24, "4")
    clients = {}
    for a in answers:  # a client key keeps its model
        assert clients.setdefault(a["client"], a["by"]) == a["by"]
    assert {"champion", "challenger"} <= set(clients.values())
    body = _label(server, answers[:16])
    assert body == {"recorded": 16, "duplicates": 0, "unknown_ids": [], "bad_labels": []}
    one = {"request_id": answers[0]["id"], "label": answers[0]["label"]}
    status, body, _ = request(port, "POST", "/feedback", json.dumps(one).encode())
    assert status == 200 and body["duplicates"] == 1 and body["recorded"] == 0
    unknown = {"request_id": "no-such-request", "label": answers[0]["label"]}
    assert request(port, "POST", "/feedback", json.dumps(unknown).encode())[0] == 404
    bad = {"request_id": answers[1]["id"], "label": "no-such-class"}
    status, body, _ = request(port, "POST", "/feedback", json.dumps(bad).encode())
    assert status == 400 and "no-such-class" in body["error"]["message"]

    final = _until_decided(server, cfg, "4")
    assert final["state"] == "rolled-back", final
    assert promotion_log.champion(name) == "1" and promotion_log._alias(name, "challenger") is None
    last = promotion_log.history(cfg, 1)[0]
    assert last["action"] == "rollout" and last["to_version"] == "1" and last["candidate"] == "4"
    _both_workers_follow(port, None)
    answer = request(port, "POST", "/predict", server["traffic"][0][0], PNG)[1]
    assert answer["model_version"] == "1" and answer["answered_by"] == "champion"
    metrics = request(port, "GET", "/metrics")[1]
    assert 'lensflow_feedback_total{outcome="duplicate"} 1.0' in metrics
    assert 'lensflow_feedback_total{outcome="unknown_id"} 1.0' in metrics
    assert "lensflow_rollout_agreements_total" in metrics
    assert 'lensflow_rollout_confidence_count{role="challenger"}' in metrics


def test_a_better_challenger_is_ramped_and_promoted(rollout_server, capsys):
    server, cfg, name = rollout_server, rollout_server["control"], rollout_server["name"]
    promotion_log.override(cfg, "4", "the test's worse champion")
    _until(lambda: request(server["port"], "GET", "/model")[1]["served"]["version"] == "4")
    rollout.start(cfg, "3")
    server["labelled"] = 0
    _both_workers_follow(server["port"], "3")
    _label(server, _serve_traffic(server, 12, "3"))
    assert _step(server, cfg)["canary_step"] == 1  # ramped after rollout.ramp_labels labels
    _until(  # client-3's key hashes to 0.97: the challenger answers it only at 100 %
        lambda: _serve_traffic(server, 4, "3")[3]["by"] == "challenger", what="ramp to 100 %"
    )
    final = _until_decided(server, cfg, "3")
    assert final["state"] == "promoted", final
    assert promotion_log.champion(name) == "3"
    last = promotion_log.history(cfg, 1)[0]
    assert last["action"] == "rollout" and (last["from_version"], last["to_version"]) == ("4", "3")
    assert last["actor"] == f"rollout:{final['run_id']}"
    run = mlflow.MlflowClient().get_run(final["run_id"])
    assert run.data.tags[rollout.STATE] == "promoted" and run.data.metrics["labelled"] >= 8
    assert main(["lineage", f"{name}/3", "--set", f"serve.rollout_dir={server['log']}"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    assert any(r["state"] == "promoted" for r in lineage["rollouts"])


def test_an_identical_challenger_is_never_decided_and_sigterm_loses_no_pair(
    rollout_server, tmp_path, capsys
):
    server, cfg, name = rollout_server, rollout_server["control"], rollout_server["name"]
    _until(lambda: request(server["port"], "GET", "/model")[1]["served"]["version"] == "3")
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_labels": 24})})
    rollout.start(cfg, "1")
    server["labelled"] = 0
    _both_workers_follow(server["port"], "1")
    answers = _serve_traffic(server, 26, "1")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": [a["id"] for a in answers],
                  "label": [a["label"] for a in answers]}).to_csv(labels, index=False)  # fmt: skip
    sets = ["--set", f"serve.port={server['port']}", "--set", f"serve.rollout_dir={server['log']}"]
    assert main(["feedback", str(labels), *sets]) == 0
    assert "26 recorded" in capsys.readouterr().out
    _serve_traffic(server, 6, "1")  # answered, their pairs still buffered: then SIGTERM
    server["process"].send_signal(signal.SIGTERM)
    assert server["process"].wait(60) == 0
    logged = set(rollout_log.read(server["log"], "pairs")["request_id"])
    assert {a["id"] for a in server["answered"]} <= logged  # no pair lost (hot swaps, SIGTERM)
    server["labelled"] += 26
    assert _step(server, cfg)["state"] == "ended"  # 26 labels >= rollout.max_labels, no decision
    assert promotion_log.champion(name) == "3"
    assert main(["rollout", "status", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "ended"
