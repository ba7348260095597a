"""Tuning on tiny real data: real Optuna (sqlite), real MLflow (sqlite), real training."""

import json

import mlflow
import pytest

from components.core import config, paths
from components.core.errors import GateFailed, UserError
from components.data import datasets, prepare, validate
from components.experiments import tune, tune_storage
from components.training import train, tuned
from tests.conftest import tiny_project

# Short trials, a wide learning-rate range (some trials learn far slower: the pruner's prey),
# and a pruner that may act from the first epoch after two complete trials.
STUDY = [
    "tune.enabled=true",
    "tune.trials=6",
    "tune.startup_trials=2",
    "tune.min_epochs=1",
    "train.epochs=3",
    "train.patience=3",
    "tune.space={train: {lr: {type: float, low: 1.0e-5, high: 3.0e-2, log: true},"
    " batch_size: {type: categorical, choices: [32, 64]}}}",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared and validated tiny project, its MLflow store and its study database."""
    root = tmp_path_factory.mktemp("tune")
    with tiny_project(root):
        cfg = config.load("params.yaml")
        datasets.run(cfg)
        prepare.run(cfg)
        assert validate.run(cfg, track=False).success
        yield root


@pytest.fixture(scope="module")
def study(tiny):
    cfg = config.load("params.yaml", STUDY)
    return {
        "cfg": cfg,
        "result": tune.run(cfg),
        "report": json.loads(paths.TUNING_REPORT.read_text()),
    }


def _runs(filter_string: str):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("lensflow").experiment_id
    return client.search_runs(experiment, filter_string, max_results=1000)


def _children(parent_id: str):
    return _runs(f"tags.mlflow.parentRunId = '{parent_id}'")


def _range(kind, low, high, **more):
    return {"type": kind, "low": low, "high": high, **more}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train": {"lrr": _range("float", 0.1, 1)}}, "unknown key 'tune.space.train.lrr'"),
        ({"prepare": {"image_size": _range("int", 8, 32)}}, "allowed here: augment, model, train"),
        ({"train": {"lr": _range("float", 0.1, 0.01)}}, "low (0.1) must be below high (0.01)"),
        ({"train": {"lr": _range("float", 0, 0.1, log=True)}}, "log scale needs low > 0"),
        ({"train": {"lr": _range("uniform", 0, 0.1)}}, "'tune.space.train.lr.type'"),
        ({"train": {"batch_size": _range("float", 16, 64)}}, "use type int or categorical"),
        ({"model": {"dropout": _range("float", 0, 1.5)}}, "1.5 is not a valid value here"),
        (
            {"model": {"arch": {"type": "categorical", "choices": ["simple_cnn", "vgg"]}}},
            "'vgg' is not a valid value here",
        ),
        ({"model": {"arch": {"type": "categorical"}}}, "categorical needs choices"),
        ({"train": {"strategy": _range("int", 0, 2)}}, "use type categorical"),
    ],
)
def test_bad_spaces_fail_with_one_line_naming_the_key(space, message):
    with pytest.raises(UserError) as error:
        config.from_dict({"tune": {"space": space}})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "tune.space." in str(error.value)


def test_the_space_covers_the_recipe_and_parses_to_dotted_keys():
    space = {
        "augment": {
            "mixup_alpha": {"type": "float", "low": 0.0, "high": 0.4},
            "preset": {"type": "categorical", "choices": ["none", "light", "standard"]},
        },
        "model": {"arch": {"type": "categorical", "choices": ["simple_cnn", "resnet_cnn"]}},
        "train": {
            "strategy": {"type": "categorical", "choices": ["fine_tune", "two_stage"]},
            "unfreeze_stages": {"type": "int", "low": 0, "high": 4},
            "epochs": {"type": "int", "low": 4, "high": 12, "step": 4},
        },
    }
    cfg = config.from_dict({"tune": {"space": space}})
    assert set(cfg.tune.space.flat()) == {
        "augment.mixup_alpha",
        "augment.preset",
        "model.arch",
        "train.strategy",
        "train.unfreeze_stages",
        "train.epochs",
    }
    assert config.from_dict(cfg.as_dict()) == cfg  # params.yaml round trip, as DVC needs it


def test_a_study_prunes_and_logs_one_parent_run_with_a_child_per_trial(study):
    report = study["report"]
    assert report["status"] == "ok" and report["n_trials"] == 6
    assert report["counts"]["pruned"] >= 1
    assert report["counts"]["complete"] + report["counts"]["pruned"] == 6
    assert set(report["best_params"]) == {"train.lr", "train.batch_size"}
    assert report["study"].startswith("lensflow-") and report["metric"] == "val_accuracy"
    assert 6 < report["epochs_trained"] < 6 * 3  # pruned trials stopped early

    parent = mlflow.MlflowClient().get_run(report["mlflow_run_id"])
    assert parent.data.tags["lensflow.step"] == "tune" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in artifacts
    children = _children(parent.info.run_id)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(6))
    status_of = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
    for child in children:
        assert child.info.status == status_of[child.data.tags["optuna.state"]]
        assert set(child.data.params) == {"train.lr", "train.batch_size"}
    history = mlflow.MlflowClient().get_metric_history
    pruned = next(r for r in children if r.data.tags["optuna.state"] == "PRUNED")
    assert len(history(pruned.info.run_id, "val/accuracy")) < 3
    best = next(r for r in children if r.data.tags["optuna.trial"] == str(report["best_trial"]))
    assert [m.step for m in history(best.info.run_id, "val/accuracy")] == [1, 2, 3]
    assert best.data.metrics["tune/value"] == report["best_value"]


def test_running_again_resumes_the_same_study_in_a_run_of_its_own(study):
    result = tune.run(config.load("params.yaml", [*STUDY, "tune.trials=2"]))
    report = json.loads(paths.TUNING_REPORT.read_text())
    assert result.study == study["result"].study and result.new_trials == 2
    assert report["n_trials"] == 8 and report["mlflow_run_id"] != study["report"]["mlflow_run_id"]
    numbers = sorted(int(r.data.tags["optuna.trial"]) for r in _children(report["mlflow_run_id"]))
    assert numbers == [6, 7]  # trial numbers continue
    runs = _runs(f"tags.`optuna.study` = '{result.study}' and tags.`lensflow.step` = 'tune'")
    assert {r.info.run_id for r in runs} == {report["mlflow_run_id"], study["result"].mlflow_run_id}


def test_train_uses_the_tuned_params_when_asked(study):
    result = train.run(config.load("params.yaml", [*STUDY, "train.use_tuned=true"]))
    assert result.epochs_run >= 1
    run = _runs("tags.`lensflow.step` = 'train'")[0]
    best = json.loads(paths.TUNING_REPORT.read_text())["best_params"]
    assert float(run.data.params["train.lr"]) == pytest.approx(best["train.lr"])
    assert run.data.params["train.batch_size"] == str(best["train.batch_size"])


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tiny):
    broken = "tune.space={model: {pretrained: {type: categorical, choices: [missing.pt]}}}"
    cfg = config.load("params.yaml", [*STUDY[:-1], broken, "tune.trials=2"])
    with pytest.raises(GateFailed, match="no trial of study .* completed"):
        tune.run(cfg)
    report = json.loads(paths.TUNING_REPORT.read_text())
    assert report["status"] == "no_complete_trial" and report["counts"]["fail"] == 2
    children = _children(report["mlflow_run_id"])
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED" and child.data.tags["optuna.state"] == "FAIL"
        assert "missing.pt" in child.data.tags["error"]
    with pytest.raises(UserError, match="no best params"):
        tuned.apply_tuned(cfg)


def test_workers_share_one_study_without_duplicate_trial_numbers(tiny):
    storage = f"sqlite:///{tiny}/workers.db"  # a study of its own
    cfg = config.load(
        "params.yaml",
        [*STUDY, "tune.trials=4", "tune.workers=2", "train.epochs=1", f"tune.storage={storage}"],
    )
    result = tune.run(cfg)
    report = json.loads(paths.TUNING_REPORT.read_text())
    assert result.new_trials == report["n_trials"] == 4
    assert report["counts"]["running"] == report["counts"]["fail"] == 0
    numbers = [int(r.data.tags["optuna.trial"]) for r in _children(report["mlflow_run_id"])]
    assert sorted(numbers) == [0, 1, 2, 3]


def test_disabled_tuning_keeps_the_last_report_or_says_none_ran(project):
    cfg = config.from_dict({})
    result = tune.run(cfg)
    assert result.status == "not_run" and json.loads(paths.TUNING_REPORT.read_text())["status"] == (
        "not_run"
    )
    with pytest.raises(UserError, match="no best params"):
        tuned.apply_tuned(cfg)
    earlier = {**json.loads(paths.TUNING_REPORT.read_text()), "status": "ok", "study": "x"}
    paths.TUNING_REPORT.write_text(json.dumps({**earlier, "best_params": {"train.lr": 0.01}}))
    tune.run(cfg)
    assert json.loads(paths.TUNING_REPORT.read_text())["status"] == "ok"  # kept
    with pytest.warns(UserWarning, match="other params"):
        assert tuned.apply_tuned(cfg).train.lr == 0.01


def test_tuned_params_are_validated_and_a_missing_report_is_a_clear_error(project):
    cfg = config.from_dict({})
    with pytest.raises(
        UserError, match=r"train.use_tuned is true but reports/tuning.json is missing"
    ):
        tuned.apply_tuned(cfg)
    with pytest.raises(UserError, match="'train.lr'"):
        config.with_values(cfg, {"train.lr": -1.0})
    with pytest.raises(UserError, match="unknown key 'trainn'"):
        config.with_values(cfg, {"trainn.lr": 0.1})


def test_the_storage_url_comes_from_the_environment_first(project, monkeypatch):
    cfg = config.from_dict({"tune": {"storage": "sqlite:///other.db"}})
    assert tune_storage.storage_url(cfg) == "sqlite:///other.db"
    monkeypatch.setenv("LENSFLOW_TUNE_STORAGE", "postgresql://me:S3cret@127.0.0.1:9/optuna")
    assert tune_storage.storage_url(cfg) == "postgresql://me:S3cret@127.0.0.1:9/optuna"
    with pytest.raises(UserError, match="LENSFLOW_TUNE_STORAGE") as error:
        tune_storage.open_storage(tune_storage.storage_url(cfg), 30)  # no driver, or no server
    assert "S3cret" not in str(error.value) and "me:***@127.0.0.1" in str(error.value)
