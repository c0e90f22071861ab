"""Settings of a model runner (env prefix RDV_RUNNER_, YAML section "runner")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.core.oip import OIP_KIND, OipArgs
from services.core.settings import ServiceSettings

RunnerRole = Literal["incumbent", "challenger", "canary"]


def group_subscription(replicas: int) -> str:
    """The SHARED subscription of the runner hosts of one replica group: stable whatever
    other groups come and go, so a group keeps its cursor across configuration changes."""
    return "runners" if replicas <= 1 else f"runners-x{replicas}"


class RunnerDeployment(BaseModel):
    """One model deployment a runner process serves (see RunnerSettings.deployments)."""

    model_config = ConfigDict(extra="forbid")

    objective: str = Field(min_length=1)
    model: str = Field(min_length=1)
    role: RunnerRole
    model_version: str = ""
    endpoint: str = Field(min_length=1)
    # What serves it: "oip" for an Open Inference Protocol server (with its `args`).
    kind: str = ""
    args: dict[str, Any] = Field(default_factory=dict)


class RunnerSettings(ServiceSettings):
    """Which deployment(s) this runner host serves, where their models listen, how hard it works.

    One deployment: `objective`, `model`, `role`, `endpoint` (and `model_version`). Several in
    one process: `deployments` (RDV_RUNNER_DEPLOYMENTS, JSON) of one objective, each with its
    own model channel and batches, all fed from the host's one subscription; the tunables
    below apply to each. `archive` hosts the objective's decoy too (with only `objective`
    set, the host is the decoy alone).

    Live (`follow`): only `objective` and `replicas`; the host follows the objective on the
    control topic and serves every enabled deployment with that replica count (0 reads as 1),
    plus the decoy's archive when the decoy has it, adding and removing runners as versions
    change. A deployment without an endpoint is looked up in `model_directory`.
    """

    model_config = SettingsConfigDict(env_prefix="RDV_RUNNER_")
    config_section: ClassVar[str] = "runner"

    objective: str = ""
    # The model deployment's name: predictions carry it.
    model: str = ""
    role: RunnerRole | None = None
    # Reported when the model's response carries no version of its own.
    model_version: str = ""
    # The model container's gRPC address, host:port.
    endpoint: str = ""
    # The deployment's kind and args (RDV_RUNNER_ARGS: JSON). Only "oip" changes what the
    # runner speaks: the Open Inference Protocol, configured by `args`
    # (services/core/oip.py); any other kind serves rendezvous.v1.ModelService.
    kind: str = ""
    args: dict[str, Any] = Field(default_factory=dict)
    # Several deployments hosted by this process (instead of the fields above).
    deployments: list[RunnerDeployment] = Field(default_factory=list)
    # Live mode: follow the control topic (see the class docstring).
    follow: bool = False
    # The replica group this host serves in live mode.
    replicas: int = Field(default=1, ge=1)
    # JSON {model name: endpoint} of the containers the local supervisor runs (live mode).
    model_directory: Path | None = None
    # How long a model added live may take to show up in the model directory and answer
    # health before the host gives up on it (and reports it not ready).
    model_start_timeout_s: float = Field(default=60.0, gt=0)
    # Pause between looks at the model directory and health checks of a starting model.
    model_poll_s: float = Field(default=0.2, gt=0)
    # How long a live host waits at start for its objective on the control topic.
    config_timeout_s: float = Field(default=60.0, gt=0)
    # How long a removed model's queued and in-flight calls may take before it is closed.
    drain_timeout_s: float = Field(default=5.0, gt=0)
    # Most tasks in flight at once (over every call); further tasks wait in the client.
    concurrency: int = Field(default=64, ge=1)
    # Most tasks scored by one PredictBatch call: the tasks that queued up while the
    # previous calls were in flight go together (one task under light load).
    max_batch: int = Field(default=32, ge=1)
    # Most model calls in flight at once. Few: that is what lets tasks queue into batches;
    # more than one: a slow call does not hold up the next batch.
    max_calls_in_flight: int = Field(default=2, ge=1)
    # Replicas of the host share this subscription; empty means the model's name (one
    # deployment) or "runners" (several, or the archive alone).
    subscription: str = ""
    # Host the objective's decoy: archive every task received (redacted) to its archive topic.
    archive: bool = False
    # The hosted decoy: tasks archived that are remembered, so that one coming again is
    # acknowledged without a second record (see DecoySettings.remember_archived).
    remember_archived: int = Field(default=20_000, ge=0)
    # What an unspecified archiving consent means (the mesh's objective default_consent).
    default_archiving: Literal["granted", "denied"] = "granted"
    # Where a brand-new subscription starts. Tasks older than the SLA are useless, so a
    # new deployment starts at the live end; an existing subscription resumes its cursor.
    start_position: Literal["earliest", "latest"] = "latest"
    # Reconnect fast after a model restart (gRPC's defaults wait up to 120 s).
    initial_reconnect_backoff_ms: int = Field(default=100, ge=1)
    max_reconnect_backoff_ms: int = Field(default=1000, ge=1)
    # Ceiling of a Predict call for a task without a deadline, and of any call.
    max_model_timeout_s: float = Field(default=10.0, gt=0)
    # How long a prediction may wait in the client for others to the same return address:
    # the models of one host answer a task within about a millisecond of each other, and what
    # they publish within this window shares one broker entry, one dispatch and one collector
    # burst (measured, S2 at 100 req/s: CPU per request -17 %, collector -30 %, broker -20 %).
    prediction_linger_ms: int = Field(default=1, ge=0)
    # A prediction is worth publishing even after the deadline (it is recorded late),
    # but a publish that hangs must end so the task can be redelivered.
    publish_timeout_s: float = Field(default=5.0, gt=0)
    # Pause after a failed receive before trying again.
    receive_retry_s: float = Field(default=0.5, gt=0)
    # A model's error text is kept for evaluation, cut to this length.
    max_error_message_chars: int = Field(default=512, ge=0)

    @model_validator(mode="after")
    def _default_subscription(self) -> RunnerSettings:
        if self.follow:
            if not self.objective or self.model or self.deployments:
                raise ValueError(
                    "a live runner host (follow) takes its objective, not model or deployments"
                )
            if not self.subscription:
                self.subscription = group_subscription(self.replicas)
            return self._check_backoff()
        single = bool(self.objective and self.model and self.endpoint and self.role)
        archive_only = self.archive and bool(self.objective) and not self.model
        if not (self.deployments or single or archive_only):
            raise ValueError(
                "a runner needs objective, model, role and endpoint, or deployments, "
                "or objective and archive"
            )
        objectives = {d.objective for d in self.deployments} | (
            {self.objective} if self.objective else set()
        )
        if len(objectives) > 1:
            raise ValueError(f"one runner host serves one objective, not {sorted(objectives)}")
        # An oip deployment's args are checked here: a host that cannot serve them says so.
        kinds = [(self.kind, self.args)] + [(d.kind, d.args) for d in self.deployments]
        for kind, args in kinds:
            if kind == OIP_KIND:
                OipArgs.model_validate(args)
        if not self.subscription:
            self.subscription = self.model if single and not self.deployments else "runners"
        return self._check_backoff()

    def _check_backoff(self) -> RunnerSettings:
        if self.max_reconnect_backoff_ms < self.initial_reconnect_backoff_ms:
            raise ValueError("max_reconnect_backoff_ms must be >= initial_reconnect_backoff_ms")
        return self

    def host_objective(self) -> str:
        """The one objective this host serves."""
        return self.objective or self.deployments[0].objective

    def hosted(self) -> list[RunnerSettings]:
        """One settings object per model deployment this process serves."""
        if not self.deployments:
            return [self] if self.model else []
        return [
            self.model_copy(
                update={
                    **deployment.model_dump(),
                    "deployments": [],
                }
            )
            for deployment in self.deployments
        ]
