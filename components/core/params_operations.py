"""params.yaml, the sections that operate on a trained model: serve (lensflow serve and
predict), schedule (the Prefect deployments) and monitor (continuous validation)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from components.core.params_pipeline import Section


class Serve(Section):
    """`lensflow serve` and `lensflow predict` (see Serving and batch scoring)."""

    host: str = "127.0.0.1"
    """Where `lensflow serve` listens; `0.0.0.0` exposes it to the network."""
    port: int = Field(8000, ge=1, le=65535)
    """Its port."""
    poll_seconds: float = Field(10.0, gt=0)
    """How often the followed alias is looked up."""
    int8: bool = False
    """Serve (and `predict` with) the int8 variant where the version shipped one
    (`lensflow.int8: shipped`), else fp32, as `/model` says."""
    top_k: int = Field(3, ge=1)
    """Classes per image in a response (`?top_k=N` overrides)."""
    max_upload_bytes: int = Field(10 * 2**20, ge=1)
    """Request body limit (413)."""
    max_pixels: int = Field(4096 * 4096, ge=1)
    """Per image, read from its header before decoding (413)."""
    max_images: int = Field(32, ge=1)
    """Images per request (413)."""
    max_request_pixels: int = Field(4 * 4096 * 4096, ge=1)
    """Per request, the pixels of all its images together, read from their headers before
    any is decoded (413)."""
    max_in_flight: int = Field(64, ge=1)
    """Requests being decoded and scored at once, counted once their body is in; the next one
    gets 503 with `Retry-After` at once."""
    max_reading: int = Field(1024, ge=1)
    """Requests whose body is still being read; the next one gets 503 with `Retry-After` at
    once. Separate from `max_in_flight`, so slow uploads cannot starve complete requests."""
    header_timeout_seconds: float = Field(10.0, gt=0)
    """A connection whose request line and headers are not all in this long after it opened
    (or after its previous answer) is closed."""
    body_timeout_seconds: float = Field(30.0, gt=0)
    """A request whose body is not all in this long after its headers gets 408."""
    retry_after_seconds: int = Field(1, ge=0)
    """The `Retry-After` of a 503."""
    threads: int = Field(1, ge=1)
    """ONNX Runtime intra-op threads per inference."""
    pool_threads: int = Field(2, ge=1)
    """Threads that decode and score the requests too big to run on the event loop (over
    65,536 pixels), so that `/health` and small requests keep answering meanwhile."""
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Processes serving one port, each following the alias (`--workers`); `auto` = the
    CPU cores this process may use."""
    registry_timeout_seconds: int = Field(5, ge=1)
    """Each registry and artifact request of the service (alias lookups, downloads) gives up
    after this long, without MLflow's own retries: a failed lookup is retried at the next
    poll, a failed download with backoff."""
    batch_max: int = Field(1, ge=1)
    """Micro-batching: up to this many same-sized images of concurrent requests run as one
    batch; 1 = off."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """Micro-batching: the longest wait to fill a batch."""
    shutdown_timeout: float = Field(10.0, gt=0)
    """On SIGTERM, seconds the requests in flight get to finish."""
    golden_atol: float = Field(1e-4, gt=0)
    """A new fp32 version is served only if its probabilities on its golden inputs are
    within this of those export wrote, with every top-1 class the same."""
    int8_min_agreement: float = Field(0.9, ge=0, le=1)
    """An int8 variant is served only if its top-1 classes on the golden inputs agree this
    often; a detector's, if this share of its boxes and the golden ones (both sides together)
    has a partner of the same class at IoU >= 0.5 on the other side. quantize ships int8 only
    when it passes the same check."""
    rollout: Literal["off", "shadow", "canary"] = "off"
    """`shadow`: `@challenger` is also loaded and scores requests off the response path;
    `canary`: it answers a sticky fraction of the traffic, which `lensflow rollout watch`
    ramps (see Live rollouts)."""
    shadow_fraction: float = Field(1.0, ge=0, le=1)
    """The fraction of requests (chosen by a hash of their id) scored by both models and
    written to the pair log; lower costs less CPU and gives the test fewer pairs."""
    rollout_dir: str | None = None
    """The pair log's folder, each worker writing in a sub-folder of its own; not inside
    the project. `null`: `$XDG_STATE_HOME/lensflow/rollouts/<registry.model_name>`
    (`~/.local/state/...`). `lensflow rollout watch` reads the same folder."""
    rollout_flush_seconds: float = Field(1.0, gt=0)
    """Pairs and labels buffered in a worker are written as a new Parquet part this often."""
    rollout_part_rows: int = Field(10_000, ge=1)
    """… or as soon as this many rows are buffered (a part never grows after it is written)."""
    rollout_max_pending: int = Field(64, ge=1)
    """Requests waiting for the off-path model; past this one is not paired (counted in
    `lensflow_rollout_skipped`), so the off-path model never holds memory or the answer."""
    offpath_nice: int = Field(19, ge=0, le=19)
    """The priority (Linux nice) of the process that scores the other model: 19 = only on
    cores the answers leave free (Linux's SCHED_IDLE policy besides nice 19: an answer
    preempts it at once; a saturated server pairs fewer requests, the rest are skipped,
    counted); lower pairs more, and the answers share the cores with it (measured in
    bench/README.md, shadow_cost)."""
    canary_key_header: str = "X-Client-Key"
    """Canary: the request header whose value keeps one client on one model; without it a
    hash of the request body decides."""
    log_images: bool = False
    """Write each paired image's bytes into the pair log too (off: only its SHA-256)."""

    @field_validator("rollout", mode="before")
    @classmethod
    def _off(cls, value):
        return "off" if value is False else value  # YAML reads a bare `off` as false


class Rollout(Section):
    """`lensflow rollout start|status|stop|watch`: the sequential test that decides a live
    rollout of `@challenger` from labelled pairs (see Live rollouts)."""

    alpha: float = Field(0.05, gt=0, lt=1)
    """The chance, over a whole rollout of two equally accurate models checked after every
    label, that the test declares either one better (mSPRT: valid at any stopping time)."""
    prior: float = Field(1.0, gt=0)
    """The mSPRT mixture Beta(prior, prior) over the share of discordant pairs the challenger
    wins: 1 is uniform; larger values look for smaller differences, more slowly for large
    ones."""
    min_pairs: int = Field(30, ge=1)
    """Labelled pairs before any decision."""
    max_labels: int = Field(5000, ge=1)
    """Labelled pairs after which the rollout ends with no decision (the champion stays)."""
    max_hours: float = Field(72.0, gt=0)
    """Hours after its start after which the rollout ends with no decision."""
    ramp: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5])
    """Canary: the fractions of traffic the challenger answers, in order; it is promoted
    only from the last one."""
    ramp_labels: int = Field(50, ge=1)
    """Canary: labelled pairs at one step before the next (sooner when the test already
    favours the challenger)."""
    poll_seconds: float = Field(10.0, gt=0)
    """How often `lensflow rollout watch` reads the log and tests."""

    @field_validator("ramp")
    @classmethod
    def _fractions(cls, ramp: list[float]) -> list[float]:
        if not ramp or any(not 0 < f <= 1 for f in ramp) or ramp != sorted(ramp):
            raise ValueError("expected increasing fractions in (0, 1], e.g. [0.05, 0.25, 0.5]")
        return ramp


class DeploymentSchedule(Section):
    """schedule.<deployment>: when Prefect starts the deployment's flow (cron or interval, or
    neither: runs only on demand) and whether that schedule is active."""

    cron: str | None = None
    """A cron expression (minute hour day month weekday), e.g. `0 3 * * 1`, checked when
    read."""
    interval: float | None = Field(None, gt=0)
    """Seconds between runs. `cron` or `interval`, not both; neither: no schedule, runs only
    when started."""
    timezone: str = "UTC"
    """The cron expression's time zone (an IANA name, e.g. `Europe/Paris`)."""
    active: bool = True
    """`false`: the deployment is created paused."""
    overrides: list[str] = Field(default_factory=list)
    """`--set` items every run applies over `params_path`, e.g. `["train.epochs=30"]`
    (checked when deploying)."""

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
    """schedule.continuous_validation: a deployment schedule plus the batch and model each
    pass checks."""

    data: str | None = "data/incoming"
    """The folder of new images each pass checks."""
    model: str | None = None
    """The model URI each pass checks; `null`: the champion."""


class Schedule(Section):
    """The Prefect deployments' schedules: `lensflow schedule` serves them, `lensflow deploy`
    sends them to a work pool (flows/deployments.py)."""

    training: DeploymentSchedule = DeploymentSchedule()
    """The training flow (`lensflow run`); default: no schedule, on demand."""
    continuous_validation: MonitoringSchedule = MonitoringSchedule(cron="0 6 * * *")
    """Continuous validation (`lensflow monitor`); default: daily at 06:00 UTC."""


class Monitor(Section):
    """Continuous validation (`lensflow monitor`) and the reference profile export makes."""

    data: str | None = None
    """The batch folder the continuous-validation flow checks when it is given none (`--data`
    wins)."""
    false_alarm_rate: float = Field(0.05, gt=0, lt=1)
    """The chance that a pass on clean data raises an alert, all drift checks together: each
    p-valued check alerts below `false_alarm_rate` / number of such checks (Bonferroni),
    whatever the batch size."""
    min_relative_accuracy: float = Field(0.95, gt=0)
    """Labelled batches: alert when the model's accuracy on the batch is under this x its
    recorded test accuracy."""
    on_alert: Literal["none", "retrain"] = "none"
    """`none`, or `retrain`: an alert starts a run of the Prefect deployment
    `lensflow-training/training`, at most one per batch and one at a time."""
    retrain_cooldown_s: float = Field(3600.0, ge=0)
    """`on_alert: retrain`: an alert starts no training run within this many seconds of the
    last one an alert started (the report says it skipped, and why); 0 = no cool-down."""
    permutations: int = Field(2000, ge=100)
    """Permutations of the MMD and class-prior tests (more cost time, not memory). Their
    smallest p-value is 1 / (1 + this): a pass that needs more for that floor to sit 5x under
    its threshold, `false_alarm_rate` / number of checks, raises it (1,599 for the 16 checks
    of 3-channel images at the default rate; 7,999 at 0.01) and says so in the report
    (`permutations.note`) and the log."""
    reference_images: int = Field(1000, ge=10)
    """Images of the test split's reference half (a seeded sample) in the reference profile
    export makes: images the model was neither trained nor selected on."""
    pca_components: int = Field(8, ge=1)
    """Dimensions the penultimate-layer embeddings (a detector's: its neck's pooled levels) are
    reduced to (PCA fitted on up to 2,000 training images) for the MMD test."""
    autoencoder_epochs: int = Field(10, ge=1)
    """Training epochs of the reference profile's convolutional autoencoder (on up to 2,000
    training images)."""


class Labels(Section):
    """Label-error detection (`lensflow labels`): out-of-sample probabilities by K-fold
    cross-fitting with the training recipe, ranked by cleanlab's confident learning."""

    enabled: bool = False
    """`lensflow run`: find label errors after validation, before training (a gate only when
    `max_noise_rate` is set)."""
    folds: int = Field(3, ge=2)
    """K: each image's probabilities come from a model trained on the other K-1 folds."""
    epochs: int | None = Field(None, ge=1)
    """Training epochs of each fold's model; `null`: `train.epochs`."""
    splits: list[Literal["train", "val", "test"]] = ["train", "val"]
    """The splits whose images are checked."""
    max_noise_rate: float | None = Field(None, ge=0, le=1)
    """The gate: fail (exit 1, the flow stops) when the estimated share of wrong labels is
    above this; `null`: no gate."""
    grid: int = Field(16, ge=1, le=16)
    """Top suspects in the grid plot (plots/label_suspects.png)."""


class Review(Section):
    """The review queue (`lensflow review export|import`) and ingest (`lensflow ingest`)."""

    url: str = "http://127.0.0.1:8080"
    """The Label Studio server (its API token: the environment variable
    `LABEL_STUDIO_API_KEY`, never params)."""
    project: str = "lensflow review"
    """The Label Studio project export creates or updates (by title)."""
    suspects: int = Field(100, ge=0)
    """At most this many suspected label errors (reports/label_issues.csv, worst first)."""
    flagged: int = Field(100, ge=0)
    """At most this many images monitoring flagged (reports/monitoring_images.csv, least
    confident first)."""
    random: int = Field(10, ge=0)
    """A seeded random sample of this many training images, so reviewers see ordinary ones."""
