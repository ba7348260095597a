import pytest
import yaml

from components.core import config, credentials
from components.core.errors import UserError


def test_repository_params_file_is_valid_and_matches_the_defaults():
    from tests.conftest import REPO

    cfg = config.load(REPO / "params.yaml")
    assert cfg == config.Config()


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(UserError) as info:
        config.load(path)
    message = str(info.value)
    assert "train.epoch" in message and "epochs" in message
    assert "\n" not in message


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(UserError, match="unknown key 'trian'"):
        config.load(path)


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(UserError, match=r"'train.lr'.*'fast'"):
        config.load(path)


def test_overrides_are_typed_and_reach_any_key(tmp_path):
    cfg = config.load(
        tmp_path / "absent.yaml",
        [
            "train.epochs=3",
            "train.lr=1e-2",
            "model.widths=[8, 16]",
            "validate.min_images_per_class=4",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.model.widths == [8, 16]
    assert cfg.validate_.min_images_per_class == 4


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train.epochz=3"])
def test_bad_overrides_are_user_errors(tmp_path, bad):
    with pytest.raises(UserError):
        config.load(tmp_path / "absent.yaml", [bad])


def test_params_hash_changes_with_any_value():
    assert config.Config().params_hash() != config.load("absent", ["seed=1"]).params_hash()


@pytest.mark.parametrize(
    "key, value",
    [
        ("tune.storage", "postgresql://me:S3cret@db.internal:5432/optuna"),
        ("tune.storage", "postgresql+psycopg2://me:p@ss:S3cret@db/optuna"),
        ("model.pretrained", "https://me:S3cret@weights.internal/resnet.pt"),
        ("data.source", "s3://bucket/images?X-Amz-Signature=1&token=S3cret"),
        ("compare.scratch", "{train.lr: 'redis://:S3cret@cache:6379/0'}"),
    ],
)
def test_a_password_in_any_value_is_refused_naming_the_key_never_the_password(key, value):
    with pytest.raises(UserError) as info:
        config.load("absent.yaml", [f"{key}={value}"])
    message = str(info.value)
    assert f"'{key}" in message and "S3cret" not in message and "\n" not in message
    if key == "tune.storage":
        assert "LENSFLOW_TUNE_STORAGE" in message


def test_urls_without_a_password_are_accepted_and_redact_hides_only_secrets():
    cfg = config.load(
        "absent.yaml",
        ["tune.storage=postgresql://lensflow@db.internal:5432/optuna", "data.source=data/raw/a:b"],
    )
    assert cfg.tune.storage == "postgresql://lensflow@db.internal:5432/optuna"
    text = "see http://u:S3cret@host:5000/x?a=1&password=S3cret and models:/m@champion"
    assert credentials.redact(text) == (
        "see http://u:***@host:5000/x?a=1&password=*** and models:/m@champion"
    )


def test_naming_the_weights_selects_their_architecture():
    from tests.conftest import REPO

    params = REPO / "params.yaml"  # it writes model.arch: simple_cnn, the default
    chosen = config.load(params, ["model.pretrained=efficientnet-lite0"]).model
    assert chosen.arch == "efficientnet_lite0"
    kept = config.load(params, ["model.pretrained=efficientnet-lite0", "model.arch=resnet18"])
    assert kept.model.arch == "resnet18"  # another arch the user set: preflight refuses it
    assert config.load(params, ["model.pretrained=w.pt"]).model.arch == "simple_cnn"
