"""compare's arms: each arm's config is validated before anything runs."""

import pytest
from scipy.stats import binomtest

from components.core import config
from components.core.errors import UserError
from components.experiments import compare, compare_arms
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
        compare_arms.arm_configs(cfg)


def test_fractions_are_validated():
    with pytest.raises(UserError, match="compare.fractions"):
        config.from_dict({"compare": {"fractions": [0.0]}})


@pytest.mark.parametrize(("b", "c"), [(1, 0), (0, 6), (5, 5), (3, 12), (40, 19), (2, 30)])
def test_mcnemar_p_is_the_exact_binomial_test(b, c):
    """The exact McNemar test is the two-sided binomial test of b successes in b + c at 1/2."""
    expected = binomtest(b, b + c, 0.5).pvalue
    assert compare.mcnemar_p(b, c) == pytest.approx(expected, rel=5e-3)  # 3 significant digits


def test_mcnemar_p_of_a_known_case_and_of_no_disagreement():
    assert compare.mcnemar_p(0, 6) == pytest.approx(2 / 2**6, rel=5e-3)  # 0.03125
    assert compare.mcnemar_p(0, 0) == 1.0
