"""Transfer strategies over epochs: which stages learn when, in which optimiser group, at
which LR, and that a frozen stage (weights and batch-norm statistics) really stays put."""

from collections import Counter

import pytest
import torch

from components.core import config
from components.training import loop, models
from tests.components.training.test_models import STRATEGY_ARCHS as ARCHS
from tests.components.training.test_models import _spec

LABELS = torch.tensor([0, 1, 2, 3, 4])


def _loop(arch, **train_keys):
    spec, _ = _spec(arch)
    cfg = config.from_dict({"train": {"epochs": 6, "head_epochs": 2, **train_keys}})
    model = models.build(spec)
    return model, loop.Loop(model, cfg, LABELS, 1, augment=None)


def _ids(modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_stages_cover_every_backbone_parameter_exactly_once(arch):
    spec, _ = _spec(arch)
    model = models.build(spec)
    counts = Counter(id(p) for stage in model.stages() for p in stage.parameters())
    head = _ids([models.head(model.network)])
    assert set(counts) | head == {id(p) for p in model.parameters()}
    assert not set(counts) & head and set(counts.values()) == {1}
    assert len(model.stages()) >= 2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("strategy", "learning_stages"),
    [("two_stage", [0, 0, 2, 2, 2, 2]), ("gradual_unfreeze", [0, 0, 1, 2, 3, 4])],
)
def test_staged_strategies_unfreeze_top_down_with_one_optimiser_group_each(
    arch, strategy, learning_stages
):
    model, training_loop = _loop(arch, strategy=strategy, unfreeze_stages=2, unfreeze_every=1)
    stages, head = model.stages(), _ids([models.head(model.network)])
    in_groups = Counter(id(p) for g in training_loop.optimizer.param_groups for p in g["params"])
    ever = min(max(learning_stages), len(stages))
    assert set(in_groups) == head | _ids(stages[len(stages) - ever :])  # none left out
    assert set(in_groups.values()) == {1}  # none twice
    for epoch, count in enumerate(learning_stages, start=1):
        training_loop.start_epoch(model, epoch)
        count = min(count, len(stages))
        learning = head | _ids(stages[len(stages) - count :])
        for name, p in model.named_parameters():
            assert p.requires_grad == (id(p) in learning), (epoch, name)


def test_layer_lr_decay_gives_each_stage_its_own_lr_falling_towards_the_input():
    model, training_loop = _loop(
        "resnet18", strategy="fine_tune", lr=0.01, backbone_lr_factor=0.5, layer_lr_decay=0.8
    )
    lr_of = {id(p): g["lr"] for g in training_loop.optimizer.param_groups for p in g["params"]}
    stages = model.stages()
    assert len(stages) == 10  # conv1, bn1, 8 basic blocks
    for i, stage in enumerate(stages):
        expected = 0.01 * 0.5 * 0.8 ** (len(stages) - 1 - i)
        assert all(lr_of[id(p)] == pytest.approx(expected) for p in stage.parameters()), i
    assert all(lr_of[id(p)] == 0.01 for p in models.head(model.network).parameters())


def _learn_one_epoch(model, training_loop, epoch):
    training_loop.start_epoch(model, epoch)
    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 5, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = loop._train_epoch(model, (images, labels), 8, training_loop)
    after = model.state_dict()
    return loss, {k for k in before if not torch.equal(before[k], after[k])}


def test_frozen_stages_keep_weights_and_batch_norm_statistics_while_the_top_learns():
    model, training_loop = _loop(
        "resnet_cnn", strategy="two_stage", unfreeze_stages=1, weight_decay=0.1, lr=0.01
    )
    prefix = {id(m): name for name, m in model.named_modules()}
    top = prefix[id(model.stages()[-1])]

    _, changed = _learn_one_epoch(model, training_loop, epoch=1)  # head only
    assert changed and all(k.startswith("network.head.") for k in changed), changed

    _, changed = _learn_one_epoch(model, training_loop, epoch=3)  # + the top stage
    assert any(k.startswith(f"{top}.") and "running_mean" in k for k in changed)
    assert all(k.startswith(("network.head.", f"{top}.")) for k in changed), changed


def test_bf16_autocast_and_channels_last_train_on_cpu():
    model, training_loop = _loop("resnet_cnn", amp=True, channels_last=True, device="cpu")
    loss, changed = _learn_one_epoch(model, training_loop, epoch=1)
    assert torch.isfinite(torch.tensor(loss)) and changed
    assert training_loop.amp_dtype == torch.bfloat16 and not training_loop.scaler.is_enabled()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_last_batch_of_one_image_is_skipped_where_batch_norm_could_not_train_on_it(project):
    import mlflow

    spec, _ = _spec("resnet_cnn", widths=[8, 8, 8, 8])  # the last block's map is 1x1 at 8 px
    spec = {**spec, "image_size": 8, "input_size": 8}
    cfg = config.from_dict({"train": {"epochs": 1, "batch_size": 4, "progress_bar": False}})
    model = models.build(spec)
    images = torch.randint(0, 255, (9, 3, 8, 8), dtype=torch.uint8)  # 4 + 4 + 1
    labels = torch.arange(9) % 5
    with mlflow.start_run():  # fit logs each epoch to the current run
        best, history, _, diverged = loop.fit(
            model, cfg, (images, labels), (images, labels), None, last_path=None
        )
    assert diverged is None and len(history) == 1 and best["state_dict"] is not None
