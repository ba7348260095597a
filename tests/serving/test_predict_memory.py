"""`lensflow predict` streams: its peak memory does not grow with the number of files."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import REPO

PEAK = "import resource, sys; from cli import main; code = main.main(sys.argv[1:]); " + (
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
)


def _peak_mb(registered, folder, out) -> float:
    """`lensflow predict` in its own process; its peak resident memory in MB."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{registered['root']}/mlflow.db",
    }
    model = f"models:/{registered['name']}/1"
    command = [sys.executable, "-c", PEAK, "predict", str(folder), "--model", model]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=registered["root"], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(list(folder.iterdir()))} images scored" in done.stdout
    return int(done.stdout.split("PEAK_KB")[1].split()[0]) / 1024


def test_predict_memory_does_not_grow_with_the_number_of_files(registered, tmp_path):
    ramp = np.add.outer(np.arange(2048), np.arange(2048)) % 256  # compresses, decodes big
    buffer = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint8)).convert("RGB").save(buffer, "PNG")
    few, many = tmp_path / "few", tmp_path / "many"
    for folder, count in ((few, 8), (many, 64)):
        folder.mkdir()
        for i in range(count):
            (folder / f"{i:02d}.png").write_bytes(buffer.getvalue())
    peak_few = _peak_mb(registered, few, tmp_path / "out-few")
    peak_many = _peak_mb(registered, many, tmp_path / "out-many")
    # each decoded 2048² RGB image is 12.6 MB: holding all 64 would add ~700 MB
    assert peak_many - peak_few <= 100, (peak_few, peak_many)
