import numpy as np
from PIL import Image

from components.data import datasets


def test_digits_are_the_real_sklearn_images(tmp_path):
    from sklearn.datasets import load_digits

    assert datasets.write("digits", tmp_path / "digits") == 1797
    classes = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert classes == [str(d) for d in range(10)]
    first = np.asarray(Image.open(tmp_path / "digits" / "0" / "0000.png"))
    expected = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    assert first.shape == (8, 8) and np.array_equal(first, expected)


def test_shapes_are_seeded_rgb_and_count_as_asked(tmp_path):
    assert datasets.write("shapes", tmp_path / "a", per_class=3, seed=7) == 30
    datasets.write("shapes", tmp_path / "b", per_class=3, seed=7)
    datasets.write("shapes", tmp_path / "c", per_class=3, seed=8)
    name = "spiral_120/0001.png"
    a, b, c = (np.asarray(Image.open(tmp_path / d / name)) for d in "abc")
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(datasets.SHAPE_CLASSES)


def test_shape_classes_differ_from_each_other():
    rng = np.random.default_rng(0)
    means = {
        n: np.mean([datasets.shape_image(n, rng) for _ in range(20)], axis=0)
        for n in datasets.SHAPE_CLASSES
    }
    names = list(means)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert np.abs(means[first] - means[second]).mean() > 5, (first, second)
