"""The rollout's sequential test: its error rate under continuous peeking (vectorised, as
bench/rollout_decisions.py runs it) and its power calculation against simulation."""

from __future__ import annotations

import numpy as np

from components.core.params_operations import Rollout
from components.release import sequential
from components.release.sequential import simulate


def test_equal_models_are_wrongly_promoted_at_most_alpha_under_peeking_after_every_label():
    settings = Rollout(max_labels=600)
    equal = simulate(0.9, 0.9, 2000, settings, seed=3)
    promoted = int((equal["outcome"] == 1).sum())
    assert sequential.wilson_upper(promoted, 2000) <= settings.alpha + 0.01
    either = int((equal["outcome"] != 0).sum())
    assert sequential.wilson_upper(either, 2000) <= settings.alpha + 0.01


def test_a_naive_test_repeated_after_every_label_would_not_hold_alpha():
    """The reason for the mixture test: the exact McNemar test of a fixed sample size,
    checked every 10 labels from 30 to 300, on equal models."""
    from scipy.stats import binom

    outcomes = np.random.default_rng(5).random((1000, 300))
    wins = np.cumsum(outcomes < 0.09, axis=1)[:, 29::10]
    n = (wins + np.cumsum((outcomes >= 0.09) & (outcomes < 0.18), axis=1)[:, 29::10]).clip(1)
    p_value = np.minimum(1, 2 * np.minimum(binom.cdf(wins, n, 0.5), binom.sf(wins - 1, n, 0.5)))
    wrong = (p_value < 0.05).any(axis=1).mean()
    assert wrong > 0.08  # well over alpha: peeking breaks a fixed-size test


def test_power_calculation_matches_simulation():
    settings = Rollout(min_pairs=1, max_labels=3000)
    predicted = sequential.labels_for_power(0.9, 0.97, settings.alpha, settings.prior, 0.8)
    runs = simulate(0.9, 0.97, 400, settings, seed=4)
    decided_by_then = (runs["outcome"] != 0) & (runs["labels"] <= predicted)
    assert abs(decided_by_then.mean() - 0.8) < 0.07
    assert (runs["outcome"] == 1).mean() > 0.95  # the better model is the one promoted


def test_verdict_decides_by_direction_only_past_the_threshold():
    assert sequential.verdict(8, 0, 0.05).decided == "challenger"
    assert sequential.verdict(0, 8, 0.05).decided == "champion"
    assert sequential.verdict(3, 2, 0.05).decided is None
    assert sequential.verdict(0, 0, 0.05).decided is None
