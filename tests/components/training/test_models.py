"""Architectures, transfer strategies and pretrained sources: what trains, and at which LR."""

import pytest
import torch

from components.core import config
from components.core.errors import UserError
from components.training import loop, models

CLASSES = [str(i) for i in range(5)]


def _meta(channels=3):
    return {
        "classes": CLASSES,
        "channels": channels,
        "image_size": 32,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
    }


def _spec(arch, channels=3, **model_keys):
    cfg = config.from_dict({"model": {"arch": arch, **model_keys}})
    return models.model_spec(cfg.model, _meta(channels)), cfg


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_architecture_takes_uint8_images_and_has_a_fresh_head(arch, channels):
    if arch in ("resnet50", "mobilenet_v3_large", "efficientnet_b0") and channels == 1:
        pytest.skip("the 3-channel case covers these larger nets")
    spec, _ = _spec(arch, channels)
    model = models.build(spec).eval()
    logits = model(torch.randint(0, 255, (2, channels, 32, 32), dtype=torch.uint8))
    assert logits.shape == (2, len(CLASSES))
    assert models.head(model.network).out_features == len(CLASSES)


# one of each family: the three from-scratch nets, a ResNet, a MobileNet, an EfficientNet
STRATEGY_ARCHS = [
    "simple_cnn",
    "resnet_cnn",
    "mini_alexnet",
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_lite0",
]


@pytest.mark.parametrize("arch", STRATEGY_ARCHS)
@pytest.mark.parametrize("strategy", ["fine_tune", "feature_extraction"])
def test_strategy_decides_what_is_trainable_and_in_which_group(arch, strategy):
    spec, _ = _spec(arch)
    cfg = config.from_dict({"train": {"strategy": strategy, "backbone_lr_factor": 0.1, "lr": 0.01}})
    model = models.build(spec)
    training_loop = loop.Loop(model, cfg, torch.tensor([0, 1, 2, 3, 4]), 1, augment=None)
    training_loop.start_epoch(model, 1)  # the strategy, not the test, freezes the backbone
    head_ids = {id(p) for p in models.head(model.network).parameters()}
    in_groups = {id(p): g for g in training_loop.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        trainable = strategy == "fine_tune" or id(p) in head_ids
        assert p.requires_grad == trainable, name
        assert (id(p) in in_groups) == trainable, name  # frozen ones are not in the optimiser
        if trainable:
            assert in_groups[id(p)]["lr"] == (0.01 if id(p) in head_ids else 0.01 * 0.1), name
    assert sum(len(g["params"]) for g in training_loop.optimizer.param_groups) == len(in_groups)


def test_feature_extraction_keeps_backbone_batch_norm_statistics_frozen():
    spec, _ = _spec("resnet_cnn", se=True)
    cfg = config.from_dict({"train": {"strategy": "feature_extraction"}})
    model = models.build(spec)
    loop.Loop(model, cfg, torch.tensor([0, 1, 2, 3, 4]), 1, augment=None).start_epoch(model, 1)
    model.train()  # as every training epoch does
    norms = [m for m in model.network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    before = norms[0].running_mean.clone()
    model(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8))
    assert torch.equal(before, norms[0].running_mean)
    assert model.network.head.training  # the rest of the model is in train mode


def test_efficientnet_lite0_imagenet_weights_load_offline_with_a_new_head():
    spec, cfg = _spec("efficientnet_lite0", pretrained="efficientnet-lite0")
    assert spec["mean"] == models.IMAGENET_MEAN  # normalisation follows the weights
    scratch = models.build(spec)
    pretrained = models.build(spec, cfg.model.pretrained)
    stem = "_conv_stem.weight"
    assert not torch.equal(
        scratch.network.state_dict()[stem], pretrained.network.state_dict()[stem]
    )
    assert pretrained.network._fc.out_features == len(CLASSES)


def test_local_state_dict_reuses_the_backbone_not_the_head(tmp_path):
    spec, _ = _spec("resnet_cnn")
    source = models.build(spec)
    torch.save(source.network.state_dict(), tmp_path / "weights.pt")
    other_spec = {**spec, "classes": ["a", "b"]}
    model = models.build(other_spec, str(tmp_path / "weights.pt"))
    assert torch.equal(model.network.stem[0].weight, source.network.stem[0].weight)
    assert model.network.head.out_features == 2


@pytest.mark.parametrize(
    ("source", "message"), [("missing.pt", "not found"), ("efficientnet-lite0", "needs model.arch")]
)
def test_bad_pretrained_sources_are_user_errors(source, message):
    spec, _ = _spec("simple_cnn")
    with pytest.raises(UserError, match=message):
        models.build(spec, source)


def test_input_size_resizes_inside_the_model_and_keeps_the_data_size_for_clients():
    spec, _ = _spec("simple_cnn", input_size=64)
    assert (spec["image_size"], spec["input_size"]) == (32, 64)  # clients send 32 px
    model = models.build(spec).eval()
    seen = model.preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert seen.shape[-2:] == (64, 64)
    old_checkpoint_spec = {k: v for k, v in spec.items() if k != "input_size"}
    assert models.build(old_checkpoint_spec).preprocess.size == 32


def test_imagenet_weights_see_64_px_by_default_and_train_on_small_images():
    spec, cfg = _spec("efficientnet_lite0", pretrained="efficientnet-lite0")
    spec = models.model_spec(cfg.model, {**_meta(), "image_size": 16})
    assert (spec["image_size"], spec["input_size"]) == (16, 64)
    model = models.build(spec, cfg.model.pretrained).train()
    assert model.preprocess(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape[-2:] == (64, 64)
    logits = model(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))
    assert logits.shape == (2, len(spec["classes"]))
    logits.sum().backward()
    # every weight learns from 16 px images: none without a gradient, none with a NaN
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) > 100 and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    own = config.from_dict({"model": {"pretrained": "efficientnet-lite0", "input_size": 40}})
    assert models.model_spec(own.model, {**_meta(), "image_size": 16})["input_size"] == 40


def test_an_input_smaller_than_the_architecture_takes_is_a_user_error():
    scratch = config.from_dict({"model": {"arch": "efficientnet_lite0"}})
    with pytest.raises(UserError, match=r"prepare.image_size is 16 px .* at least 32"):
        models.model_spec(scratch.model, {**_meta(), "image_size": 16})
    deep = config.from_dict({"model": {"widths": [8, 8, 8, 8, 8]}})
    with pytest.raises(UserError, match="at least 32"):
        models.model_spec(deep.model, {**_meta(), "image_size": 16})
