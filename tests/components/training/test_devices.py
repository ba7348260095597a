"""The CUDA path without a GPU: an epoch on a second device ("meta": tensors with shapes and
devices but no values) mixes no devices; a last.pt written on a GPU resumes on the CPU."""

import math
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from components.core import config
from components.training import loop, models

SPEC = {
    "arch": "simple_cnn",
    "widths": [8, 16],
    "dropout": 0.0,
    "classes": list("abcd"),
    "channels": 1,
    "image_size": 16,
    "mean": [0.5],
    "std": [0.25],
}


# calls that take tensors of two devices by design: copies between devices, and the check
# Module.to makes before it swaps a parameter's data for its copy on the new device
TRANSFERS = {torch.Tensor.copy_, torch._has_compatible_shallow_copy_type}


class OnAnotherDevice(TorchFunctionMode):
    """Sees every torch call: records those whose tensors sit on more than one device (a CPU
    scalar, which CUDA kernels take as a number, aside), and answers `.item()` / `.tolist()`
    of a meta tensor with ones, since meta tensors hold no values."""

    def __init__(self):
        super().__init__()
        self.mixed, self.meta_calls = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if "meta" in devices:
            self.meta_calls += 1
            if len(devices) > 1 and func not in TRANSFERS:
                self.mixed.append(f"{getattr(func, '__name__', func)}: {sorted(devices)}")
        if func in (torch.Tensor.item, torch.Tensor.tolist) and args[0].is_meta:
            return 1.0 if func is torch.Tensor.item else torch.ones(args[0].shape).tolist()
        return func(*args, **kwargs)


def _cfg(**train_keys):
    return config.from_dict({"train": {"epochs": 2, "progress_bar": False, **train_keys}})


@pytest.mark.parametrize("class_weights", [False, True])
def test_an_epoch_on_another_device_mixes_no_devices(monkeypatch, class_weights):
    monkeypatch.setattr(loop, "device", lambda name: torch.device("meta"))  # the "GPU"
    images = torch.randint(0, 255, (40, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    cfg = _cfg(class_weights=class_weights, ema_decay=0.9, grad_clip_norm=1.0, batch_size=16)
    model = models.build(SPEC)
    with OnAnotherDevice() as mode:
        training_loop = loop.Loop(model, cfg, labels, steps_per_epoch=3, augment=None)
        training_loop.start_epoch(model, 1)
        loop._train_epoch(model, (images, labels), cfg.train.batch_size, training_loop)
        loop.evaluate_loss(training_loop.evaluated_model, images, labels)
    assert mode.meta_calls > 100  # the epoch did run on the second device
    assert mode.mixed == [], "\n".join(mode.mixed)
    assert {p.device.type for p in model.parameters()} == {"meta"}


@contextmanager
def _storages_tagged_cuda(tensors):
    """torch.save records these tensors' storages as on cuda:0, as a GPU run writes them."""
    on_gpu = {t.untyped_storage().data_ptr() for t in tensors}
    saving = [True]

    def tagger(storage):
        return "cuda:0" if saving[0] and storage.data_ptr() in on_gpu else None

    torch.serialization.register_package(0, tagger, lambda storage, location: None)
    try:
        yield
    finally:
        saving[0] = False  # registered for good, but silent from now on


def test_a_last_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path):
    cfg = _cfg(device="cpu")
    images = torch.randint(0, 255, (32, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(32) % 4
    model = models.build(SPEC)
    written = loop.Loop(model, cfg, labels, steps_per_epoch=2, augment=None)
    written.start_epoch(model, 1)
    loop._train_epoch(model, (images, labels), 16, written)
    best = {"val_loss": 1.0, "epoch": 1, "val_accuracy": 0.5, "state_dict": model.state_dict()}
    path = tmp_path / "last.pt"
    # what lives on the GPU in a GPU run: weights, optimiser state, the best epoch's weights
    on_gpu = [*model.state_dict().values()]
    on_gpu += [v for s in written.optimizer.state.values() for v in s.values() if v.dim() > 0]
    with _storages_tagged_cuda(on_gpu):
        loop_state = {"best": best, "history": [], "bad_epochs": 0}
        loop._save_last(cfg, 1, model, written, loop_state, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # the file does say cuda

    resumed_model = models.build(SPEC)
    resumed = loop.Loop(resumed_model, cfg, labels, steps_per_epoch=2, augment=None)
    state = loop._load_last(cfg, resumed_model, resumed, path)
    assert state["epoch"] == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name
    moments = [v for s in resumed.optimizer.state.values() for v in s.values() if v.dim() > 0]
    assert moments and all(v.device.type == "cpu" for v in moments)
    resumed.start_epoch(resumed_model, 2)
    loss, _ = loop._train_epoch(resumed_model, (images, labels), 16, resumed)
    assert math.isfinite(loss) and loss > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_real_gpu_an_epoch_trains_and_its_last_checkpoint_resumes_on_a_cpu(
    tmp_path, monkeypatch
):
    images = torch.randint(0, 255, (48, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(48) % 4
    cfg = _cfg(class_weights=True, amp=True, ema_decay=0.9, batch_size=16)  # device: auto
    model = models.build(SPEC)
    on_gpu = loop.Loop(model, cfg, labels, steps_per_epoch=3, augment=None)
    assert on_gpu.device.type == "cuda"
    on_gpu.start_epoch(model, 1)
    loss, _ = loop._train_epoch(model, (images, labels), 16, on_gpu)
    val_loss, _ = loop.evaluate_loss(on_gpu.evaluated_model, images, labels)
    assert math.isfinite(loss) and math.isfinite(val_loss)
    best = {"val_loss": val_loss, "epoch": 1, "val_accuracy": 0.0, "state_dict": None}
    path = tmp_path / "last.pt"
    loop._save_last(cfg, 1, model, on_gpu, {"best": best, "history": [], "bad_epochs": 0}, path)

    monkeypatch.setattr(loop, "device", lambda name: torch.device("cpu"))  # a CPU machine
    resumed_model = models.build(SPEC)
    on_cpu = loop.Loop(resumed_model, cfg, labels, steps_per_epoch=3, augment=None)
    loop._load_last(cfg, resumed_model, on_cpu, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor.cpu()), name
