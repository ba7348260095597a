"""Preflight: the mistakes found before any work starts, each a UserError naming the key."""

import pytest

from components import preflight
from components.core import config
from components.core.errors import UserError
from components.core.params_pipeline import Model


def _cfg(source, **model):
    return config.from_dict({"data": {"source": str(source)}, "model": model})


def test_a_folder_of_photographs_passes(photographs):
    preflight.check(_cfg(photographs))
    preflight.check(_cfg(photographs, pretrained="efficientnet-lite0"))  # sees 64 px
    preflight.check(_cfg("digits"))  # a built-in dataset is written by the data step


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "folder not found"),
        (lambda root: root / "photos" / "china" / "000.jpg", "not a directory"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no class folders"),
        (lambda root: root / "photos" / "china", "no class folders"),
        (lambda root: (root / "one" / "a").mkdir(parents=True) or root / "one", "one class"),
    ],
)
def test_unusable_data_folders(photographs, make, message):
    source = make(photographs.parent)
    with pytest.raises(UserError, match=rf"^data.source {source}: {message}"):
        preflight.check(_cfg(source))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"arch": "efficientnet_lite0"}, "prepare.image_size is 16 px .* needs at least 32"),
        (
            {"pretrained": "efficientnet-lite0", "input_size": 16},
            "model.input_size is 16 px .* needs at least 32",
        ),
        ({"widths": [8] * 5}, "prepare.image_size is 16 px .* simple_cnn needs at least 32"),
        (
            {"pretrained": "efficientnet-lite0", "arch": "resnet18"},
            "model.pretrained efficientnet-lite0: these are efficientnet_lite0 weights",
        ),
        ({"pretrained": "torchvision"}, "simple_cnn has no torchvision weights"),
        ({"pretrained": "no/such/weights.pt"}, "no/such/weights.pt: file not found"),
    ],
)
def test_models_that_cannot_run_or_load_their_weights(photographs, model, message):
    with pytest.raises(UserError, match=message):
        preflight.check(_cfg(photographs, **model))


def test_a_compare_arm_is_named(photographs):
    arm = Model(arch="efficientnet_lite0", input_size=16)
    with pytest.raises(UserError, match="^compare.transfer: model.input_size is 16 px"):
        preflight.check_model(arm, 16, prefix="compare.transfer: ")


def test_training_params_that_need_a_file(photographs, project):
    with pytest.raises(UserError, match="train.use_tuned .* reports/tuning.json is missing"):
        preflight.check(config.with_values(_cfg(photographs), {"train.use_tuned": True}))
    tuning_first = {"train.use_tuned": True, "tune.enabled": True}
    preflight.check(config.with_values(_cfg(photographs), tuning_first))
    with pytest.raises(UserError, match="--resume: models/last.pt not found"):
        preflight.check(_cfg(photographs), resume=True)


def test_the_study_storage_opens_only_with_tuning_on(tmp_path, monkeypatch):
    missing = f"sqlite:///{tmp_path / 'no-such-folder' / 'optuna.db'}"
    cfg = config.from_dict({"tune": {"storage": missing}})
    preflight.check_tune_storage(cfg)  # tuning off: never opened
    tuning = config.with_values(cfg, {"tune.enabled": True})
    with pytest.raises(UserError, match=f"^tune.storage {missing}: .*unable to open database"):
        preflight.check_tune_storage(tuning)
    monkeypatch.setenv("LENSFLOW_TUNE_STORAGE", "postgresql://lensflow:S3cret@127.0.0.1:9/optuna")
    with pytest.raises(UserError, match=r"^LENSFLOW_TUNE_STORAGE .*lensflow:\*\*\*@") as refused:
        preflight.check_tune_storage(tuning)
    assert "S3cret" not in str(refused.value)
    monkeypatch.delenv("LENSFLOW_TUNE_STORAGE")
    good = f"sqlite:///{tmp_path / 'optuna.db'}"
    preflight.check_tune_storage(config.with_values(tuning, {"tune.storage": good}))
    assert (tmp_path / "optuna.db").exists()
