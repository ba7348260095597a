"""compare's arms: each arm's config is validated before anything runs."""

import pytest

from components import compare, config
from components.config import UserError
from tests.conftest import TINY


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"transfer": {"prepare.image_size": 32}}, "is not an augment, model or train key"),
        ({"transfer": {"model.pretrained": None}}, "compare.transfer: set model.pretrained"),
        ({"scratch": {"model.pretrained": "efficientnet-lite0"}}, "must stay null"),
        ({"transfer": {"train.lrr": 0.1}}, "unknown key 'train.lrr'"),
    ],
)
def test_arm_overrides_are_validated(overrides, message):
    cfg = config.from_dict({**TINY, "compare": overrides})
    with pytest.raises(UserError, match=message):
        compare.arm_configs(cfg)


def test_fractions_are_validated():
    with pytest.raises(UserError, match="compare.fractions"):
        config.from_dict({"compare": {"fractions": [0.0]}})
