"""Optional micro-batching (serve.batch_max > 1): images of concurrent requests that share a
model and a size run as one batch, after at most serve.batch_wait_ms. Off (batch_max 1), an
image runs at once on the calling coroutine: no queue, no task switch."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import numpy as np


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait_s: float):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue | None = None

    async def predict(self, model, image: np.ndarray) -> np.ndarray:
        """Probabilities [classes] of one uint8 image [1, C, H, W]."""
        if self._queue is None:
            return model.predict(image)[0]
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((model, image, done))
        return await done

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if self.max_batch == 1:
            yield
            return
        self._queue = asyncio.Queue()
        worker = asyncio.create_task(self._run())
        try:
            yield
        finally:  # uvicorn ends the lifespan after the requests in flight are answered
            worker.cancel()
            self._queue = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(waiting) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    waiting.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            self._answer(waiting)

    @staticmethod
    def _answer(waiting: list) -> None:
        groups = defaultdict(list)
        for model, image, done in waiting:
            groups[(id(model), image.shape)].append((model, image, done))
        for group in groups.values():
            model = group[0][0]
            try:
                probabilities = model.predict(np.concatenate([image for _, image, _ in group]))
            except Exception as exc:  # the requests fail, the batcher goes on
                for _, _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, _, done), row in zip(group, probabilities, strict=True):
                if not done.done():
                    done.set_result(row)
