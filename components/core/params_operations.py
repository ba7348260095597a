"""params.yaml, the sections that operate on a trained model: serve (lensflow serve and
predict), schedule (the Prefect deployments) and monitor (continuous validation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from components.core.params_pipeline import Section


class Serve(Section):
    """`lensflow serve` and `lensflow predict` (README "Serving")."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535)
    poll_seconds: float = Field(10.0, gt=0, description="how often @champion is looked up")
    int8: bool = Field(False, description="serve the int8 variant when the version shipped one")
    top_k: int = Field(3, ge=1, description="classes per image in a response (?top_k= overrides)")
    max_upload_bytes: int = Field(10 * 2**20, ge=1, description="request body limit (413)")
    max_pixels: int = Field(4096 * 4096, ge=1, description="per image, read from the header (413)")
    max_images: int = Field(32, ge=1, description="images per request (413)")
    max_in_flight: int = Field(64, ge=1, description="requests in progress; beyond: 503 at once")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After of a 503")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per inference")
    batch_max: int = Field(1, ge=1, description="micro-batching: images per run; 1 = off")
    batch_wait_ms: float = Field(2.0, ge=0, description="micro-batching: longest wait to fill")
    shutdown_timeout: float = Field(10.0, gt=0, description="SIGTERM: seconds to finish requests")
    golden_atol: float = Field(1e-4, gt=0, description="fp32: max |p - golden p| to be served")
    int8_min_agreement: float = Field(
        0.9, ge=0, le=1, description="int8: top-1 agreement with the golden fp32 classes"
    )


class DeploymentSchedule(Section):
    """schedule.<deployment>: when Prefect starts the deployment's flow (cron or interval, or
    neither: runs only on demand) and whether that schedule is active."""

    cron: str | None = Field(None, description="a cron expression, e.g. '0 3 * * 1'")
    interval: float | None = Field(None, gt=0, description="seconds between runs")
    timezone: str = Field("UTC", description="the cron expression's time zone")
    active: bool = Field(True, description="false: the schedule is created paused")
    overrides: list[str] = Field(default_factory=list, description="--set items for each run")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}, e.g. Europe/Paris") from None
        return name

    @model_validator(mode="after")
    def _one_schedule(self) -> DeploymentSchedule:
        if self.cron is not None and self.interval is not None:
            raise ValueError("set cron or interval, not both (neither: no schedule)")
        return self


class MonitoringSchedule(DeploymentSchedule):
    data: str | None = Field("data/incoming", description="the folder of new images to check")
    model: str | None = Field(None, description="a model URI; None: the champion")


class Schedule(Section):
    """The Prefect deployments' schedules: `lensflow schedule` serves them, `lensflow deploy`
    sends them to a work pool (flows/deployments.py)."""

    training: DeploymentSchedule = DeploymentSchedule()
    continuous_validation: MonitoringSchedule = MonitoringSchedule(cron="0 6 * * *")


class Monitor(Section):
    """Continuous validation (`lensflow monitor`) and the reference profile export makes."""

    data: str | None = Field(None, description="the batch folder the flow checks by default")
    false_alarm_rate: float = Field(0.05, gt=0, lt=1, description="per pass, all checks")
    min_relative_accuracy: float = Field(0.95, gt=0, description="of the recorded test accuracy")
    on_alert: Literal["none", "retrain"] = "none"
    permutations: int = Field(1000, ge=100, description="of the MMD and class-prior tests")
    reference_images: int = Field(1000, ge=10, description="validation images in the profile")
    pca_components: int = Field(8, ge=1, description="embedding dimensions the MMD test sees")
    autoencoder_epochs: int = Field(10, ge=1)
