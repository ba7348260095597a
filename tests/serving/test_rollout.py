"""Live rollouts against a real `lensflow serve` (canary, 2 workers) on the package's tiny
registry, with labelled traffic from the test split and the controller's passes run here.
The models are trained by the training component on a copy of the package's project (one
module fixture, registered into the package's MLflow store):

- a clearly worse challenger (version 6: trained fully with about 30 % of the train split's
  labels flipped, those of 3 of its 10 classes, against version 5, trained fully on the true
  labels): rolled back, never promoted;
- a clearly better one (version 5, against version 4 as champion, trained for one epoch):
  ramped 50 → 100 % and promoted through the promotion log (action `rollout`);
- an identical one (version 1 against version 3, the same weights): nothing decided until
  rollout.max_labels.

Along the way: every answer names its version and the model that gave it, a client key keeps
its model, /feedback answers 404/400 and ignores duplicates (across workers), /metrics counts
pairs, and after SIGTERM every answered request's pair is in the log (across the hot swaps the
rollouts made).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cli.main import main
from components.core import config, paths
from components.data import overrides, prepare, validate
from components.release import export, promotion_log, registry, rollout, rollout_log
from components.training import train
from tests.servers import free_port
from tests.serving import test_server
from tests.serving.conftest import request, start_server

SERVE = ("serve.rollout=canary", "serve.poll_seconds=0.2", "serve.rollout_flush_seconds=2")
CONTROL = ("rollout.min_pairs=8", "rollout.ramp=[0.5,1.0]", "rollout.ramp_labels=6",
           "rollout.max_labels=300", "promote.lease_s=10")  # fmt: skip
PNG = {"Content-Type": "image/png"}
RAW = Path("data/raw/shapes")
FLIPPED = 0.3  # of the train split's labels, for the worse challenger
LR = 0.03  # the tiny model learns the shapes in its 8 epochs (0.003: about 65 % right)
_until = partial(test_server._until, seconds=60)  # two workers, each following two aliases


@pytest.fixture(scope="module")
def trained(registered, tmp_path_factory):
    """{"one_epoch": "4", "full": "5", "flipped": "6"}: trained (the tiny params' epochs, or
    1, at LR: the full model is right on every test image), exported and registered from a
    copy of the package's project, whose prepared data and reports stay as the other modules
    expect."""
    work = tmp_path_factory.mktemp("rollout-models")
    keep_out = shutil.ignore_patterns("mlflow.db*", "mlartifacts")
    shutil.copytree(registered["root"], work, dirs_exist_ok=True, ignore=keep_out)
    versions, accuracy = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        cfg = config.with_values(config.load("params.yaml"), {"train.lr": LR})
        for key, epochs in (("one_epoch", 1), ("full", cfg.train.epochs)):
            cfg_of = config.with_values(cfg, {"train.epochs": epochs})
            versions[key], accuracy[key] = _trained_version(cfg_of)
        overrides.write(RAW, _flipped_train_labels(FLIPPED, cfg.seed))
        prepare.run(cfg)
        assert validate.run(cfg).success
        versions["flipped"], accuracy["flipped"] = _trained_version(cfg)
    assert list(versions.values()) == ["4", "5", "6"]
    # clearly worse and clearly better on the test split (the export's ONNX accuracy)
    assert accuracy["full"] - accuracy["flipped"] >= 0.15, accuracy
    assert accuracy["full"] - accuracy["one_epoch"] >= 0.3, accuracy
    return versions


def _trained_version(cfg) -> tuple[str, float]:
    train.run(cfg)
    accuracy = export.run(cfg).accuracy
    return registry.run(cfg).version, accuracy


def _flipped_train_labels(share: float, seed: int) -> dict[str, str]:
    """{path: another class} (labels.csv, the relabel file) for every train image of `share`
    of the classes, rotated among them (a → b → c → a): `share` of the train labels flipped,
    every class as large as before, and the model learns to name those classes wrongly. (Flips
    spread at random over all classes cost the tiny model little accuracy: the true class
    stays the majority of its images, so that model is not clearly worse.)"""
    manifest = pd.read_parquet(paths.MANIFEST, columns=["path", "label", "split"])
    classes = sorted(manifest["label"].unique())
    picked = list(np.random.default_rng(seed).permutation(classes)[: round(share * len(classes))])
    rotated = dict(zip(picked, picked[1:] + picked[:1], strict=True))
    train_rows = manifest[(manifest["split"] == "train") & manifest["label"].isin(picked)]
    rows = zip(train_rows["path"], train_rows["label"], strict=True)
    return {path: rotated[label] for path, label in rows}


@pytest.fixture(scope="module")
def rollout_server(registered, trained, tmp_path_factory):
    name = registered["name"]
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "champion", trained["full"])
    log_dir = tmp_path_factory.mktemp("pair-log")
    settings = (*SERVE, f"serve.rollout_dir={log_dir}")
    control = config.load("params.yaml", ["train.epochs=2", *settings, *CONTROL])
    port = free_port()
    process = start_server(registered["root"], port, *settings, "serve.workers=2")
    yield {**registered, "port": port, "process": process, "log": Path(log_dir),
           "control": control, "traffic": _test_split(), "answered": [], "labelled": 0,
           "sent": 0, "versions": trained}  # fmt: skip
    if process.poll() is None:
        process.kill()
    process.wait()
    client.set_registered_model_alias(name, "champion", "1")  # as the other modules expect
    if promotion_log._alias(name, "challenger"):
        client.delete_registered_model_alias(name, "challenger")


def _test_split() -> list[tuple[bytes, str]]:
    manifest = pd.read_parquet(paths.MANIFEST, columns=["path", "label", "split"])
    test = manifest[manifest["split"] == "test"]
    root = Path("data/raw/shapes")
    pairs = zip(test["path"], test["label"], strict=True)
    return [((root / path).read_bytes(), label) for path, label in pairs]


def _serve_traffic(server, n: int, version: str) -> list[dict]:
    """n requests from the test split, client keys client-(i % 8); every answer checked and
    kept."""
    answers = []
    for i in range(n):  # the test split in turn, across calls
        png, label = server["traffic"][server["sent"] % len(server["traffic"])]
        server["sent"] += 1
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


def _until_decided(server, cfg, version: str, batch: int, rounds: int) -> dict:
    """Controller passes, with `batch` more labelled requests before each while it runs."""
    now = _step(server, cfg)
    for _ in range(rounds):
        if now["state"] != "running":
            return now
        _label(server, _serve_traffic(server, batch, version))
        now = _step(server, cfg)
    return now


def test_a_worse_challenger_is_rolled_back_and_feedback_is_checked(rollout_server):
    server, cfg, name = rollout_server, rollout_server["control"], rollout_server["name"]
    port, full, worse = server["port"], server["versions"]["full"], server["versions"]["flipped"]
    started, server["labelled"] = rollout.start(cfg, worse, "trained on flipped labels"), 0
    assert started["state"] == "running" and started["challenger"] == worse
    _both_workers_follow(port, worse)
    answers = _serve_traffic(server, 24, worse)
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

    final = _until_decided(server, cfg, worse, batch=34, rounds=4)
    assert final["state"] == "rolled-back", final
    assert final["summary"].endswith("the challenger is significantly less accurate")
    assert promotion_log.champion(name) == full
    assert promotion_log._alias(name, "challenger") is None
    last = promotion_log.history(cfg, 1)[0]
    assert last["action"] == "rollout" and last["to_version"] == full
    assert last["candidate"] == worse
    _both_workers_follow(port, None)
    answer = request(port, "POST", "/predict", server["traffic"][0][0], PNG)[1]
    assert answer["model_version"] == full and answer["answered_by"] == "champion"
    metrics = request(port, "GET", "/metrics")[1]
    assert 'lensflow_feedback_total{outcome="duplicate"} 1.0' in metrics
    assert 'lensflow_feedback_total{outcome="unknown_id"} 1.0' in metrics
    assert "lensflow_rollout_agreements_total" in metrics
    assert 'lensflow_rollout_confidence_count{role="challenger"}' in metrics


def test_a_better_challenger_is_ramped_and_promoted(rollout_server, capsys):
    server, cfg, name = rollout_server, rollout_server["control"], rollout_server["name"]
    weak, full = server["versions"]["one_epoch"], server["versions"]["full"]
    promotion_log.override(cfg, weak, "the test's champion, trained for one epoch")
    _until(lambda: request(server["port"], "GET", "/model")[1]["served"]["version"] == weak)
    rollout.start(cfg, full)
    server["labelled"] = 0
    _both_workers_follow(server["port"], full)
    _label(server, _serve_traffic(server, 12, full))
    assert _step(server, cfg)["canary_step"] == 1  # ramped after rollout.ramp_labels labels
    _until(  # client-3's key hashes to 0.97: the challenger answers it only at 100 %
        lambda: _serve_traffic(server, 4, full)[3]["by"] == "challenger", what="ramp to 100 %"
    )
    final = _until_decided(server, cfg, full, batch=16, rounds=6)
    assert final["state"] == "promoted", final
    assert promotion_log.champion(name) == full
    last = promotion_log.history(cfg, 1)[0]
    assert last["action"] == "rollout"
    assert (last["from_version"], last["to_version"]) == (weak, full)
    assert last["actor"] == f"rollout:{final['run_id']}"
    run = mlflow.MlflowClient().get_run(final["run_id"])
    assert run.data.tags[rollout.STATE] == "promoted" and run.data.metrics["labelled"] >= 8
    assert main(["lineage", f"{name}/{full}", "--set", f"serve.rollout_dir={server['log']}"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    assert any(r["state"] == "promoted" for r in lineage["rollouts"])


def test_an_identical_challenger_is_never_decided_and_sigterm_loses_no_pair(
    rollout_server, tmp_path, capsys
):
    server, cfg, name = rollout_server, rollout_server["control"], rollout_server["name"]
    promotion_log.override(cfg, "3", "the test's champion: the same weights as version 1")
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


def test_the_off_path_process_pairs_at_nice_19_and_is_replaced_when_killed(registered, tmp_path):
    """The other model scores in a process of its own at nice 19 (the caller's priority
    unchanged), fed by the worker's event loop; killed, it is replaced: the jobs it had not
    finished are counted as skipped, the next ones are paired, and drain() + close() write
    them. A version it was told to forget (more challengers than it keeps) is sent again when
    a job needs it."""
    import asyncio
    import dataclasses
    import io
    import os

    import onnxruntime  # noqa: F401  (the served model's session, as a worker has it)
    from PIL import Image
    from prometheus_client import CollectorRegistry

    from components.core.params_operations import Serve
    from serving import model
    from serving.rollout import Job, Rollout

    settings = Serve(rollout="shadow", rollout_flush_seconds=0.2)
    onnx_file = registered["root"] / paths.ONNX
    champion = model.load(model.Source(str(onnx_file), file=str(onnx_file)), None, settings)
    challenger = dataclasses.replace(champion, version="7")  # the same weights: they agree
    images = np.random.default_rng(0).integers(0, 256, (6, 1, champion.channels, 16, 16),
                                               dtype=np.uint8)  # fmt: skip

    def submit(live, ids, other=challenger):
        for request_id in ids:
            arrays = [images[int(request_id[-1]) % len(images)]]
            job = Job(request_id, "champion", champion, other, arrays,
                      list(champion.predict(arrays[0])), 0.001, ["sha"])  # fmt: skip
            live.submit(job)

    def logged():
        frame = rollout_log.read(tmp_path, "pairs")
        return dict(zip(frame["request_id"], frame["challenger_class"], strict=True))

    async def until(condition, what: str, seconds: float = 30):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    metrics = CollectorRegistry()

    async def serve(live):
        await live.attach()
        first = live.offpath.pid
        await until(lambda: os.getpriority(os.PRIO_PROCESS, first) == 19, what="nice 19")
        assert os.getpriority(os.PRIO_PROCESS, 0) == before
        submit(live, [f"a{i}" for i in range(4)])
        await until(lambda: {f"a{i}" for i in range(4)} <= set(logged()), what="the first pairs")
        os.kill(first, signal.SIGSTOP)  # it takes the next job from the pipe, never finishes
        submit(live, ["lost0"])
        await until(lambda: live.sent == 5, what="the job sent")
        os.kill(first, signal.SIGKILL)
        await until(lambda: live.offpath.pid != first and live.pipe, what="a new process")
        assert metrics.get_sample_value("lensflow_rollout_skipped_total") == 1
        submit(live, [f"b{i}" for i in range(3)])
        for version in ("8", "9", "10", "11", "7"):  # 7 forgotten after 8-11, then sent again
            submit(live, [f"c{version}0"], dataclasses.replace(challenger, version=version))
            await until(lambda: live.pending == 0, what="the job paired")
        # a grayscale champion answered (its arrays: 1 channel); the RGB challenger scores the
        # request's bytes decoded at its own 3 channels
        gray = dataclasses.replace(champion, version="g", channels=1)
        png = io.BytesIO()
        Image.fromarray(images[0][0].transpose(1, 2, 0)).save(png, "PNG")
        live.submit(Job("e0", "champion", gray, challenger, [images[0][:, :1]],
                        list(champion.predict(images[0])), 0.001, ["sha"],
                        data=[png.getvalue()]))  # fmt: skip
        submit(live, ["d0"])  # queued, sent by drain()
        await live.drain()

    before = os.getpriority(os.PRIO_PROCESS, 0)
    live = Rollout(settings, tmp_path, metrics)
    try:
        asyncio.run(serve(live))
    finally:
        live.close()
    pairs = logged()
    assert {"b0", "b1", "b2", "c70", "c80", "c110", "d0", "e0"} <= set(pairs)
    assert "lost0" not in pairs and live.pending == 0
    assert set(pairs.values()) <= set(champion.classes)  # every pair scored, e0 included
