import math

import pytest
import torch

from components.core import config, paths
from components.data import datasets
from components.training import augment
from components.training.augment import BatchAugment


def _cfg(**augment_keys):
    return config.from_dict({"augment": augment_keys}).augment


def _images(n=8, size=16):
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[..., : size // 2] = 255  # left half white: a flip is visible
    return images, torch.arange(n) % 10


@pytest.mark.parametrize(
    ("flip", "source", "allowed"),
    [("auto", "digits", False), ("auto", "shapes", False), ("auto", "detection_shapes", False),
     ("auto", "data/raw/mine", True), (True, "digits", True), (False, "data/raw/mine", False)],
)  # fmt: skip
def test_flips_are_never_automatic_for_the_builtin_datasets(flip, source, allowed):
    assert augment.flips_allowed(_cfg(flip=flip), source) is allowed
    assert set(paths.BUILTIN) == {"digits", "shapes", "detection_shapes"}  # each one above


def test_preset_none_leaves_the_batch_alone():
    aug = BatchAugment(_cfg(preset="none"), 10, allow_flips=True, seed=0)
    assert not aug.active
    images, labels = _images(32)
    out, targets = aug(images, labels)
    assert torch.equal(out, images.float())
    assert torch.equal(targets, labels)


def test_flip_only_gives_the_image_or_its_mirror():
    aug = BatchAugment(_cfg(preset="light"), 10, allow_flips=True, seed=0)
    del aug.options["crop_scale"]  # isolate the flip from the crop
    images, labels = _images(32)
    out, targets = aug(images, labels)
    same = (out - images.float()).abs().amax(dim=(1, 2, 3)) < 1e-3
    mirrored = (out - images.flip(-1).float()).abs().amax(dim=(1, 2, 3)) < 1e-3
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    assert torch.equal(targets, labels)


def test_flips_stay_off_when_not_allowed():
    aug = BatchAugment(_cfg(preset="light"), 10, allow_flips=False, seed=0)
    del aug.options["crop_scale"]
    images, labels = _images(32)
    out, _ = aug(images, labels)
    assert torch.allclose(out, images.float(), atol=1e-3)


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_presets_are_seeded_and_keep_shape_and_range(preset):
    images, labels = _images()

    def augmented(seed):
        torch.manual_seed(seed)  # TrivialAugmentWide draws from torch's global generator
        return BatchAugment(_cfg(preset=preset), 10, True, seed=seed)(images, labels)[0]

    first, again, other = augmented(1), augmented(1), augmented(2)
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 255
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_mixup_and_cutmix_make_soft_targets():
    aug = BatchAugment(_cfg(mixup_alpha=0.4, cutmix_alpha=1.0), 10, True, seed=0)
    assert aug.active
    images, labels = _images()
    _, targets = aug(images, labels)
    assert targets.shape == (8, 10)
    assert torch.allclose(targets.sum(1), torch.ones(8))


def test_training_with_standard_augmentation_and_mixup_learns(tiny_cfg, project):
    from components.core import paths
    from components.data import prepare, validate
    from components.training import train

    cfg = tiny_cfg.model_copy(
        update={"augment": _cfg(preset="standard", flip=True, mixup_alpha=0.2, cutmix_alpha=1.0)}
    )
    datasets.run(cfg)
    prepare.run(cfg)
    assert validate.run(cfg).success
    result = train.run(cfg)
    # 10 classes: chance is 0.1 and an untrained loss ln(10); 0.64 and 0.63 ln(10) on CPU
    assert result.best_val_accuracy >= 0.55
    assert result.best_val_loss < 0.66 * math.log(10)
    assert (project / paths.PLOTS / "augmentation_preview.png").stat().st_size > 1000
