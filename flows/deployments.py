"""The Prefect deployments of lensflow's flows, defined once and used two ways:

- `lensflow schedule` serves them in one long-running process (`prefect.serve`), which runs
  their flow runs itself;
- `lensflow deploy` sends them to a process work pool, whose workers
  (`prefect worker start --pool lensflow`) run their flow runs.

Both load the flows from the project folder (`flow.from_source`), so a flow run works in that
folder and reads its params file there, as `lensflow run` does.

A deployment is one record on the Prefect server, named `<flow>/<deployment>`, with one set of
schedules; the mode that wrote it last runs it. So that its schedule never fires for two
processes, each command refuses a deployment that the other mode is running now: not paused,
and polled within the last minute by its serving process or a worker of its pool. Otherwise
it takes the deployment over: `lensflow deploy` moves a served one to the pool, `lensflow
schedule` replaces one of a pool (Prefect keeps a deployment's work pool when it is served).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from components.core import config
from components.core.errors import UserError
from components.core.params_operations import DeploymentSchedule

LIVE_POLL_SECONDS = 60  # Prefect's own threshold: a deployment not polled for this is NOT_READY

# The process pool's base job template: a flow run's `job_variables` fill the worker's job
# configuration, and a worker runs its command with the worker's environment (database
# password, S3 keys). This one fixes the command (None: the worker's own `python -m
# prefect.engine`), environment and working folder (the deployment's pull step sets it), and
# refuses every variable it does not name (additionalProperties: false): a flow run may name
# its process and set its labels and output streaming, nothing else.
POOL_TEMPLATE = {
    "job_configuration": {
        "command": None,
        "env": {},
        "labels": "{{ labels }}",
        "name": "{{ name }}",
        "stream_output": "{{ stream_output }}",
        "working_dir": None,
    },
    "variables": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "stream_output": {"type": "boolean", "default": True},
        },
    },
}


@dataclass(frozen=True)
class Definition:
    """One deployment: the flow at `entrypoint` (a file of the project : its flow function),
    deployed as `name` with these default parameters, on `schedule`."""

    flow_name: str  # the @flow's name; Prefect names the deployment "<flow_name>/<name>"
    name: str
    entrypoint: str
    schedule: DeploymentSchedule
    parameters: dict = field(default_factory=dict)
    description: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    def describe(self) -> str:
        s = self.schedule
        if s.cron is not None:
            when = f"cron '{s.cron}' ({s.timezone})"
        elif s.interval is not None:
            when = f"every {s.interval:g} s"
        else:
            when = "on demand (no schedule)"
        return f"{self.full_name}: {when}{'' if s.active else ', paused'}"


def definitions(cfg: config.Config, params_path: str) -> list[Definition]:
    """The deployments of this project, with their schedules from `cfg.schedule`."""
    training, monitoring = cfg.schedule.training, cfg.schedule.continuous_validation
    return [
        Definition(
            "lensflow-training",
            "training",
            "flows/training.py:training_flow",
            training,
            {"params_path": params_path, "overrides": training.overrides},
            "lensflow run: validate, train, evaluate, export, register (params_path, read by "
            "each run, plus overrides)",
        ),
        Definition(
            "lensflow-continuous-validation",
            "continuous-validation",
            "flows/monitoring.py:continuous_validation_flow",
            monitoring,
            {
                "params_path": params_path,
                "data": monitoring.data,
                "model": monitoring.model,
                "overrides": monitoring.overrides,
            },
            "lensflow monitor: one continuous-validation pass on the data folder",
        ),
    ]


def load(
    cfg: config.Config, params_path: str, overrides: list[str], project: Path
) -> list[Definition]:
    """The definitions of `cfg`, loaded from `params_path` with `overrides` (`--set` of schedule
    keys only), checked: each deployment's own overrides apply to the params, and its flow file
    is in `project`."""
    for item in overrides:
        if not item.startswith("schedule."):
            raise UserError(
                f"--set {item!r}: only schedule.* keys here; what the runs train with comes from "
                f"{params_path} (each run reads it) and schedule.<deployment>.overrides"
            )
    found = definitions(cfg, params_path)
    for definition in found:
        key = f"schedule.{definition.name.replace('-', '_')}"
        try:
            config.load(params_path, definition.schedule.overrides)
        except UserError as exc:
            raise UserError(f"{key}.overrides: {exc}") from None
        _check_schedule(definition.schedule, params_path, key)
        flow_file = project / definition.entrypoint.partition(":")[0]
        if not flow_file.exists():
            raise UserError(
                f"{flow_file}: not found; run this command in the lensflow project folder"
            )
    return found


def _check_schedule(schedule: DeploymentSchedule, params_path: str, key: str) -> None:
    """Prefect's own check of the cron expression, as a UserError naming the key."""
    from pydantic import ValidationError

    try:
        _schedules(schedule)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        field = "cron" if schedule.cron is not None else "interval"
        raise UserError(f"{params_path}: '{key}.{field}': {message}") from None


def _schedules(schedule: DeploymentSchedule) -> list:
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if schedule.cron is not None:
        return [CronSchedule(cron=schedule.cron, timezone=schedule.timezone)]
    if schedule.interval is not None:
        return [IntervalSchedule(interval=datetime.timedelta(seconds=schedule.interval))]
    return []


def existing(found: list[Definition]) -> dict[str, object]:
    """{full name: the deployment on the server} of the definitions that exist there."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    on_server = {}
    with get_client(sync_client=True) as client:
        for definition in found:
            try:
                on_server[definition.full_name] = client.read_deployment_by_name(
                    definition.full_name
                )
            except ObjectNotFound:
                continue
    return on_server


def conflicts(on_server: dict[str, object], work_pool: str | None) -> list[str]:
    """Why each deployment may not be written now by the mode `work_pool` (None: served by
    `lensflow schedule`): the other mode runs it now (see the module's docstring)."""
    return [
        _conflict_message(name, deployment.work_pool_name)
        for name, deployment in on_server.items()
        if deployment.work_pool_name != work_pool
        and not deployment.paused
        and _polled_recently(deployment.last_polled)
    ]


def _polled_recently(last_polled: datetime.datetime | None) -> bool:
    if last_polled is None:
        return False
    age = datetime.datetime.now(datetime.UTC) - last_polled
    return age.total_seconds() < LIVE_POLL_SECONDS


def _conflict_message(full_name: str, holder_pool: str | None) -> str:
    if holder_pool is None:
        holder = "a running `lensflow schedule` serves it"
        release = "stop that process (it pauses its deployments as it stops)"
    else:
        holder = f"a worker of work pool '{holder_pool}' runs it (lensflow deploy)"
        release = f"stop the workers of '{holder_pool}'"
    return (
        f"deployment {full_name}: {holder} and it is not paused, so its schedule would fire "
        f"twice; {release}, or pause the deployment in the Prefect UI, then run this again"
    )


def runner_deployments(found: list[Definition], project: Path) -> list:
    """Prefect RunnerDeployments of the definitions, their flows loaded from `project`."""
    from prefect import Flow

    deployments = []
    for definition in found:
        flow = Flow.from_source(source=str(project), entrypoint=definition.entrypoint)
        if flow.name != definition.flow_name:
            raise UserError(
                f"{definition.entrypoint}: the flow is named {flow.name!r}, "
                f"expected {definition.flow_name!r}"
            )
        deployments.append(
            flow.to_deployment(
                name=definition.name,
                schedules=_schedules(definition.schedule),
                paused=not definition.schedule.active,
                parameters=definition.parameters,
                description=definition.description,
                tags=["lensflow"],
            )
        )
    return deployments


def serve(found: list[Definition], project: Path) -> None:
    """Serve the deployments in this process until it is stopped (Ctrl-C, SIGTERM); on the
    way out Prefect pauses them."""
    import warnings

    from prefect import serve as prefect_serve

    on_server = existing(found)
    _refuse(conflicts(on_server, work_pool=None))
    deployments = runner_deployments(found, project)
    _take_from_pools(on_server)
    # Prefect's SIGTERM handler calls an async stop without awaiting it; the runner stops
    # (and pauses the deployments) all the same
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
    prefect_serve(*deployments, print_starting_message=False)


def _take_from_pools(on_server: dict[str, object]) -> None:
    """Delete the deployments of a work pool, to serve them afresh: served over, they would
    keep their pool, and its workers would pick up their runs too."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name, deployment in on_server.items():
            if deployment.work_pool_name is not None:
                client.delete_deployment(deployment.id)
                print(f"  {name}: taken from work pool '{deployment.work_pool_name}'")


def deploy(found: list[Definition], project: Path, pool: str) -> None:
    """Create the process work pool `pool` unless it exists, and deploy to it."""
    from prefect import deploy as prefect_deploy

    _refuse(conflicts(existing(found), work_pool=pool))
    ensure_process_pool(pool)
    prefect_deploy(
        *runner_deployments(found, project),
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )


def ensure_process_pool(pool: str) -> None:
    """The process work pool `pool` with POOL_TEMPLATE: created when missing, its template
    set when it has another (an older lensflow's, or one edited in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=pool, type="process", base_job_template=POOL_TEMPLATE)
                )
            except ObjectAlreadyExists:  # another command made it just now
                pass
            return
        if found.type != "process":
            raise UserError(
                f"work pool {pool!r} exists with type {found.type!r}; lensflow deploy needs a "
                "process pool: choose another with --pool"
            )
        if found.base_job_template != POOL_TEMPLATE:
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=POOL_TEMPLATE))


def api_url() -> str | None:
    """The Prefect server's API (the environment's PREFECT_API_URL or the profile's); None:
    Prefect would start a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _refuse(problems: list[str]) -> None:
    if problems:
        raise UserError("; ".join(problems))
