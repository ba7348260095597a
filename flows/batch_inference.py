"""The batch-inference flow: score files and folders with the registry's model (serving/batch.py
does the work; this only wires it as a Prefect task, for a schedule or a deployment)."""

from __future__ import annotations

from prefect import flow, task


@task(name="batch-predict")
def batch_predict(params_path: str, inputs: list[str], model_uri: str | None, out: str) -> dict:
    from components.core import config
    from serving import batch

    result = batch.run(config.load(params_path), inputs, model_uri, out)
    return {
        "model_version": result.model_version,
        "scored": result.scored,
        "skipped": [{"path": path, "reason": reason} for path, reason in result.skipped],
        "parquet": result.parquet,
        "csv": result.csv,
    }


@flow(name="batch-inference")
def batch_inference_flow(
    inputs: list[str],
    model_uri: str | None = None,
    out: str = "predictions",
    params_path: str = "params.yaml",
) -> dict:
    return batch_predict(params_path, inputs, model_uri, out)
