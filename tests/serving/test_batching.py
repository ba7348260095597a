"""Micro-batching (serve.batch_max > 1) on the registered ONNX model: concurrent images of one
size run as one batch and each gets its own row; images of another size run apart."""

from __future__ import annotations

import asyncio

import numpy as np

from components.core import paths
from serving.batching import MicroBatcher
from serving.model import ServedModel, session


class CountingModel(ServedModel):
    def predict(self, images):
        self.info.setdefault("batches", []).append(len(images))
        return super().predict(images)


def test_concurrent_images_of_one_size_run_as_one_batch(registered):
    onnx_session = session(str(registered["root"] / paths.ONNX), threads=1)
    model = CountingModel("1", onnx_session, [], 3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, (1, 3, 20, 24), dtype=np.uint8))
    batcher = MicroBatcher(max_batch=8, max_wait_s=0.05)

    async def serve():
        async with batcher.lifespan(None):
            return await asyncio.gather(*(batcher.predict(model, image) for image in images))

    answers = asyncio.run(serve())
    assert sorted(model.info["batches"]) == [1, 3]
    for image, answer in zip(images, answers, strict=True):
        expected = onnx_session.run(["probabilities"], {"images": image})[0][0]
        np.testing.assert_allclose(answer, expected, atol=1e-6)
