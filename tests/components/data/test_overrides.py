"""<root>/labels.csv, the relabels prepare applies: every problem named, one line each."""

from __future__ import annotations

import pytest
from PIL import Image

from components.core.errors import UserError
from components.data import overrides


def test_relabels_are_read_and_every_problem_is_one_line(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "a.png")
    assert overrides.read(tmp_path, ["cat", "dog"]) == {}  # no file: no relabels
    overrides.write(tmp_path, {"dog/a.png": "cat", "cat/a.png": "dog"})
    assert (tmp_path / "labels.csv").read_text().splitlines() == [
        "path,label", "cat/a.png,dog", "dog/a.png,cat"]  # fmt: skip
    assert overrides.read(tmp_path, ["cat", "dog"]) == {"cat/a.png": "dog", "dog/a.png": "cat"}

    (tmp_path / "labels.csv").write_text(
        "path,label\ncat/a.png,bird\ncat/gone.png,dog\ndog/a.png,cat\ndog/a.png,cat\n"
    )
    with pytest.raises(UserError) as error:
        overrides.read(tmp_path, ["cat", "dog"])
    assert str(error.value).splitlines() == [
        f"{tmp_path}/labels.csv:2: unknown class 'bird' for cat/a.png",
        f"{tmp_path}/labels.csv:3: cat/gone.png is not an image in a class folder",
        f"{tmp_path}/labels.csv:5: dog/a.png is listed twice",
    ]
    (tmp_path / "labels.csv").write_text("file,class\n")
    with pytest.raises(UserError, match="expected the header 'path,label'"):
        overrides.read(tmp_path, ["cat", "dog"])
