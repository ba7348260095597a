"""`POST /feedback`: true labels for answered requests, written beside the pair log.

    {"request_id": "…", "label": "cat"}            one label (`"image": N` for the Nth image
                                                   of a multi-image request; default 0)
    [{"request_id": …, "label": …}, …]             a batch (`lensflow feedback FILE`)

One label: 200 recorded (or a duplicate, ignored), 404 an id no worker paired, 400 a label
that is not one of the model's classes. A batch answers 200 with what happened to each kind
(`recorded`, `duplicates`, `unknown_ids`, `bad_labels`), recording the good ones.

Another worker may have paired the request and not written its part yet: an id not found is
looked for again until two flush periods have passed (serve.rollout_flush_seconds).
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request
from starlette.responses import Response

from serving.images import BadRequest


def endpoint(service, read_body, as_json):
    async def feedback(request: Request) -> Response:
        rollout = service.rollout
        if rollout is None:
            message = "no rollout here (serve.rollout is off): nothing to label"
            return as_json(_err(404, message), 404)
        try:
            body = await read_body(request, service)
            items, single = _parse(body)
        except BadRequest as exc:
            return as_json(_err(exc.status, exc.message), exc.status)
        classes = set(service.model.classes) if service.model else set()
        bad = [item for item in items if item["label"] not in classes]
        good = [item for item in items if item["label"] in classes]
        keys = {(item["request_id"], item["image"]) for item in good}
        known = await _find(rollout, keys, service.settings.rollout_flush_seconds)
        done = await asyncio.to_thread(rollout.labelled, known)
        recorded, duplicates, now = [], 0, time.time()
        for item in good:
            key = (item["request_id"], item["image"])
            if key not in known:
                continue
            if key in done:
                duplicates += 1
                continue
            done.add(key)
            recorded.append({**item, "time": now})
        await asyncio.to_thread(rollout.add_labels, recorded)
        unknown = [i["request_id"] for i in good if (i["request_id"], i["image"]) not in known]
        counts = rollout.metrics.feedback
        for outcome, n in (("recorded", len(recorded)), ("duplicate", duplicates),
                           ("unknown_id", len(unknown)), ("bad_label", len(bad))):  # fmt: skip
            if n:
                counts.labels(outcome).inc(n)
        if single and bad:
            names = ", ".join(sorted(classes)[:20])
            return as_json(_err(400, f"label {bad[0]['label']!r} is not a class of the model "
                                f"({names})"), 400)  # fmt: skip
        if single and unknown:
            return as_json(_err(404, f"request_id {unknown[0]!r}: no paired request has it"), 404)
        return as_json({
            "recorded": len(recorded), "duplicates": duplicates, "unknown_ids": unknown,
            "bad_labels": [{"request_id": b["request_id"], "label": b["label"]} for b in bad],
        })  # fmt: skip

    return feedback


async def _find(rollout, keys: set, flush_seconds: float) -> set:
    deadline = time.monotonic() + 2 * flush_seconds + 0.5
    while True:
        known = await asyncio.to_thread(rollout.known, keys)
        if known == keys or time.monotonic() > deadline:
            return known
        await asyncio.sleep(min(0.2, flush_seconds / 2))


def _parse(body: bytes) -> tuple[list[dict], bool]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(400, f"the body is not JSON ({exc})") from None
    single = isinstance(data, dict)
    items = [data] if single else data
    if not isinstance(items, list):
        raise BadRequest(400, "expected {request_id, label} or a list of them")
    parsed = []
    for n, item in enumerate(items):
        ok = isinstance(item, dict) and isinstance(item.get("request_id"), str)
        ok = ok and isinstance(item.get("label"), str)
        image = item.get("image", 0) if isinstance(item, dict) else None
        if not ok or not isinstance(image, int) or image < 0:
            where = "" if single else f"item {n}: "
            raise BadRequest(400, f"{where}expected {{request_id: str, label: str, image?: int}}")
        parsed.append({"request_id": item["request_id"], "image": image, "label": item["label"]})
    return parsed, single


def _err(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}
