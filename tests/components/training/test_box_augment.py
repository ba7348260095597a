"""Box-aware augmentation: after every crop and flip, each box still frames what it framed,
and boxes the crop cut away are gone with their labels."""

import torch

from components.core import config
from components.training import box_augment

SIZE = 32


def _cfg(flip, crop_probability, jitter=0.0):
    return config.from_dict(
        {
            "task": "detection",
            "data": {"source": "detection_shapes"},
            "augment": {"flip": flip},
            "detection": {
                "image_size": SIZE,
                "augment": {"crop_probability": crop_probability, "jitter": jitter},
            },
        }
    )


def _bright_extent(image: torch.Tensor):
    """x1, y1, x2, y2 of the pixels over half brightness, or None."""
    ys, xs = (image[0] > 127).nonzero(as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_boxes_follow_flips_and_crops_and_leave_with_what_is_cut_away():
    torch.manual_seed(0)
    n = 64
    images = torch.zeros(n, 3, SIZE, SIZE, dtype=torch.uint8)
    images[:, :, 4:12, 2:10] = 255  # one white 8 x 8 square, near the left edge
    box = torch.tensor([[2.0, 4.0, 10.0, 12.0]])
    targets = [{"boxes": box.clone(), "labels": torch.tensor([2])} for _ in range(n)]
    transform = box_augment.transform(_cfg(flip=True, crop_probability=1.0))
    out, moved = box_augment.apply(transform, images, targets)
    assert out.dtype == torch.float32 and out.shape == images.shape and out.max() <= 1.0
    kept = flipped = 0
    for image, target in zip((out * 255).round(), moved, strict=True):
        extent = _bright_extent(image)
        assert len(target["boxes"]) == len(target["labels"]) <= 1
        if len(target["boxes"]):
            kept += 1
            assert target["labels"].tolist() == [2]
            assert extent is not None
            assert torch.allclose(target["boxes"][0], extent, atol=2.0), (target, extent)
            flipped += bool(extent[0] > SIZE / 2)
        else:  # dropped: the crop left (almost) nothing of the square
            assert extent is None or (extent[2:] - extent[:2]).min() <= 3
    assert 0 < kept < n and flipped > 0  # some crops cut the square away, some flips moved it

    # a flip alone: exactly the mirrored box, in the built-in set only when asked for
    plain = box_augment.transform(_cfg(flip=True, crop_probability=0.0))
    out, moved = box_augment.apply(plain, images[:16], targets[:16])
    for image, target in zip((out * 255).round(), moved, strict=True):
        mirrored = bool(image[0, 8, SIZE - 6] == 255)
        expected = torch.tensor([[SIZE - 10.0, 4.0, SIZE - 2.0, 12.0]]) if mirrored else box
        assert torch.equal(target["boxes"], expected)
    assert box_augment.transform(_cfg(flip="auto", crop_probability=0.0)) is None
    assert box_augment.apply(None, images[:2], targets[:2])[1] == targets[:2]
