"""Files the pipeline writes are whole or absent: a kill mid-write never leaves a torn file."""

import json

import pytest
import torch

from components.core import paths
from components.training import models
from tests.components.training.test_models import _spec


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    report = tmp_path / "reports" / "evaluation.json"
    paths.write_json(report, {"accuracy": 0.9})
    with pytest.raises(KeyboardInterrupt), paths.atomic(report) as partial:
        partial.write_text('{"accuracy": 0.')  # half of the new report...
        raise KeyboardInterrupt  # ...when the process is stopped
    assert json.loads(report.read_text()) == {"accuracy": 0.9}
    assert list(report.parent.iterdir()) == [report]  # no partial file left behind


def test_a_checkpoint_save_interrupted_half_way_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    spec, _ = _spec("simple_cnn")
    path = tmp_path / "checkpoint.pt"
    models.save_checkpoint(models.build(spec), spec, path)
    before = path.read_bytes()

    real_save = torch.save

    def killed_half_way(data, file):
        real_save(data, file)
        with open(file, "r+b") as written:
            written.truncate(100)  # only the start of the file reached the disk
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        models.save_checkpoint(models.build(spec), spec, path)
    assert path.read_bytes() == before
    models.load_checkpoint(path)  # still loads
