"""The drift statistics: valid p-values under no drift, small ones under drift, enough
permutations to fire, memory that grows with neither the batch nor the permutations."""

import tracemalloc

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from components.drift import drift


def test_mmd_permutation_p_values_are_uniform_without_drift_and_tiny_with_it():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(60, 4))
    p_values = [
        drift.mmd_permutation(rng.normal(size=(20, 4)), reference, 2.0, 99, seed)[1]
        for seed in range(100)
    ]
    # under no drift P(p <= a) <= a: at a = 0.1, about 10 of 100, and surely fewer than 20
    assert sum(p <= 0.1 for p in p_values) < 20
    shifted = rng.normal(size=(20, 4)) + 1.0
    assert drift.mmd_permutation(shifted, reference, 2.0, 999, 0)[1] == pytest.approx(1 / 1000)


def test_chi2_permutation_agrees_with_the_asymptotic_test_on_large_counts():
    rng = np.random.default_rng(1)
    batch = rng.choice(4, size=400, p=[0.3, 0.3, 0.2, 0.2])
    reference = rng.choice(4, size=600, p=[0.25, 0.25, 0.25, 0.25])
    statistic, p_value = drift.chi2_permutation(batch, reference, 4, 4000, 0)
    table = np.stack([np.bincount(batch, minlength=4), np.bincount(reference, minlength=4)])
    expected = chi2_contingency(table, correction=False)
    assert statistic == pytest.approx(expected.statistic)
    assert p_value == pytest.approx(expected.pvalue, abs=0.01)


def test_bonferroni_splits_the_false_alarm_rate_between_the_checks():
    tested = [{"name": n, "test": "ks", "statistic": 0.1, "p_value": p}
              for n, p in (("a", 0.02), ("b", 0.5), ("c", 0.004))]  # fmt: skip
    checks = drift.bonferroni(tested, 0.03)
    assert [c["threshold"] for c in checks] == [0.01] * 3
    assert [c["passed"] for c in checks] == [True, True, False]


def test_image_properties_see_brightness_blur_and_raw_size():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(5, 3, 8, 8), dtype=np.uint8)
    flat = np.full_like(images, 100)
    sizes = np.array([40, 40, 40, 40, 40])
    noisy = drift.image_properties(images, sizes, sizes // 2)
    smooth = drift.image_properties(flat, sizes, sizes)
    assert (noisy["sharpness"] > 0.01).all() and (smooth["sharpness"] == 0).all()
    assert smooth["brightness"] == pytest.approx(np.full(5, 100 / 255))
    assert (noisy["aspect"] == 2).all() and (noisy["size"] == np.sqrt(800)).all()
    assert {"channel_mean_2", "channel_std_2"} <= set(noisy)


def test_too_few_permutations_for_the_threshold_are_raised_with_one_line_naming_both_keys():
    used, note = drift.permutations_for(16, 0.01, 100)
    threshold = 0.01 / 16
    assert 1 / (used + 1) <= threshold / drift.FLOOR_MARGIN < 1 / used
    assert "monitor.permutations=100 raised to 7999" in note and "\n" not in note
    assert "monitor.false_alarm_rate / 16 checks = 0.000625" in note
    assert drift.permutations_for(16, 0.05, 2000) == (2000, "")  # the defaults need none


def test_the_class_prior_test_of_a_200k_image_batch_stays_under_100_mb():
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 10, size=200_000)
    reference = rng.integers(0, 10, size=1_000)
    tracemalloc.start()
    try:
        statistic, p_value = drift.chi2_permutation(batch, reference, 10, 2000, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"{peak / 1e6:.0f} MB"
    assert 0 < p_value <= 1 and statistic >= 0


def test_mmd_permutations_cost_time_not_memory():
    rng = np.random.default_rng(4)
    batch, reference = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))

    def peak(permutations: int) -> int:
        tracemalloc.start()
        try:
            drift.mmd_permutation(batch, reference, 3.0, permutations, 0)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(4000) - peak(64) < 2e6  # [1000 x 4000] arrays would be 32 MB each
