"""The training recipe's switches: optimiser groups, LR schedules, EMA, class weights."""

import pytest
import torch

from components.core import config
from components.training import loop, models


def _model():
    spec = {
        "arch": "simple_cnn",
        "widths": [8, 16],
        "dropout": 0.0,
        "classes": list("abc"),
        "channels": 1,
        "image_size": 16,
        "mean": [0.5],
        "std": [0.25],
    }
    return models.build(spec)


def _loop(steps_per_epoch=10, **train_keys):
    cfg = config.from_dict({"train": {"epochs": 4, **train_keys}})
    model = _model()
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    return model, loop.Loop(model, cfg, labels, steps_per_epoch, augment=None)


def test_every_parameter_is_optimised_once_and_norms_get_no_weight_decay():
    model, training_loop = _loop(weight_decay=0.05)
    groups = training_loop.optimizer.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # none missing, none twice
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay_of[id(p)] == (0.05 if p.ndim > 1 else 0.0), name  # conv/linear weights


def test_sgd_uses_nesterov_momentum():
    _, training_loop = _loop(optimizer="sgd", momentum=0.8)
    assert isinstance(training_loop.optimizer, torch.optim.SGD)
    assert training_loop.optimizer.param_groups[0]["momentum"] == 0.8
    assert training_loop.optimizer.param_groups[0]["nesterov"]


def _lrs(training_loop, model, epochs=4, steps=10, val_losses=None):
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps):
            loss = model(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)).sum() * 0
            training_loop.step(model, loss)
            lrs.append(training_loop.optimizer.param_groups[0]["lr"])
        training_loop.after_epoch(val_losses[epoch] if val_losses else 1.0)
    return lrs


def test_cosine_warms_up_then_decays_to_zero_per_batch():
    model, training_loop = _loop(lr=0.1, warmup_epochs=1, schedule="cosine")
    lrs = _lrs(training_loop, model)
    assert lrs[8] == pytest.approx(0.1, rel=0.02) and lrs[0] < lrs[5] < lrs[9]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and lrs[20] > lrs[30]


def test_onecycle_peaks_mid_run_and_step_drops_tenfold():
    model, training_loop = _loop(lr=0.1, schedule="onecycle")
    lrs = _lrs(training_loop, model)
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[0] < max(lrs) and lrs[-1] < lrs[0]
    model, training_loop = _loop(lr=0.1, schedule="step", step_epochs=2)
    lrs = _lrs(training_loop, model)
    assert lrs[0] == lrs[19] == 0.1 and lrs[20] == pytest.approx(0.01)


def test_plateau_follows_the_validation_loss():
    model, training_loop = _loop(lr=0.1, schedule="plateau")
    lrs = _lrs(training_loop, model, epochs=5, val_losses=[1.0, 1.0, 1.0, 1.0, 1.0])
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.01)


def test_ema_is_what_gets_evaluated_and_averages_the_weights_with_its_decay():
    decay = 0.9
    model, training_loop = _loop(ema_decay=decay, lr=0.01)
    assert training_loop.evaluated_model is not model
    images = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    expected = None  # the first step copies the weights, every later one averages them in
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(images), torch.zeros(8, dtype=torch.long))
        training_loop.step(model, loss)
        live = [p.detach().clone() for p in model.parameters()]
        if expected is None:
            expected = live
        else:
            expected = [decay * e + (1 - decay) * w for e, w in zip(expected, live, strict=True)]
    averaged = list(training_loop.evaluated_model.parameters())
    for got, want in zip(averaged, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    gap = sum(float((a - w).abs().sum()) for a, w in zip(averaged, live, strict=True))
    assert gap > 0  # behind the live weights


def test_class_weights_favour_rare_classes():
    _, training_loop = _loop(class_weights=True)
    weights = training_loop.criterion.weight
    assert weights[1] == weights[2] > weights[0] and float(weights.mean()) == pytest.approx(1.0)


def test_gradient_clipping_bounds_the_update():
    model, training_loop = _loop(
        grad_clip_norm=1e-3, optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0
    )
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    images = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    loss = torch.nn.functional.cross_entropy(model(images), torch.zeros(8, dtype=torch.long)) * 1e4
    training_loop.step(model, loss)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) <= 1e-3 * 1.01
