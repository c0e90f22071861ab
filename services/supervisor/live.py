"""The supervisor's view of the control topic: the mesh planned from it, live.

Once the control component is ready (it has seeded the topic from the mesh file), the
supervisor reads the objective configurations from the topic with a `ControlFollower` of its
own, plans the mesh from them (`services.supervisor.plan`), and plans again for every new
version; the `Supervisor` starts and stops what the difference says.

The mesh serves the objectives its mesh file names, each as the topic holds it: a broker
(and so a control topic) can be shared by several meshes, tests or tenants, and an objective
another mesh put on the topic is not this supervisor's to run processes for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from services.core.bus import Bus, connect
from services.core.control_topic import ControlFollower
from services.core.control_topic import ObjectiveConfig as ControlConfig
from services.core.settings import PulsarSettings, TlsSettings
from services.runner.live import write_model_directory
from services.supervisor.plan import (
    EvaluatorAddress,
    Ports,
    ProcessSpec,
    model_directory,
    model_endpoints,
    plan,
)

log = logging.getLogger(__name__)

Changed = Callable[[], Awaitable[None]]


class LiveMesh:
    """Follows the control topic and plans the mesh from what it holds."""

    def __init__(  # noqa: PLR0917 (the mesh's coordinates, each needed)
        self,
        pulsar_url: str,
        pulsar_admin_url: str,
        state_dir: Path,
        rendezvous_listen: str | Sequence[str],
        ports: Ports,
        objectives: Iterable[str] = (),
        retry_delay_s: float = 0.5,
        evaluator: EvaluatorAddress | None = None,
        pulsar: PulsarSettings | None = None,
        tls: TlsSettings | None = None,
        privacy: dict[str, str] | None = None,
    ) -> None:
        # `pulsar`: authentication and TLS, for the supervisor's own client and every process.
        self.pulsar = (pulsar or PulsarSettings()).model_copy(
            update={"service_url": pulsar_url, "admin_url": pulsar_admin_url}
        )
        self.tls = tls
        # The keyring's address and the pseudonym key (`plan.privacy_env`), for every
        # process that writes, reads or forgets records about a subject.
        self.privacy = privacy
        self.state_dir = state_dir
        # One address, or one per rendezvous replica.
        self.rendezvous_listen = rendezvous_listen
        self.ports = ports
        # The mesh file's objectives: the topic holds each once the control component seeded
        # it, and only these are planned.
        self.objectives = list(objectives)
        self.retry_delay_s = retry_delay_s
        self.evaluator = evaluator
        self.directory = model_directory(state_dir)
        self._bus: Bus | None = None
        self._follower: ControlFollower | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def versions(self) -> dict[str, int]:
        """The version of each objective the plan follows."""
        follower = self._follower
        return {} if follower is None else {n: c.version for n, c in self._configs().items()}

    def _configs(self) -> dict[str, ControlConfig]:
        assert self._follower is not None, "open() first"
        held = self._follower.configs
        return {name: held[name] for name in self.objectives if name in held}

    async def open(self, timeout_s: float, changed: Changed) -> None:
        """Caught up with the topic, holding every objective of the mesh file; `changed` is
        awaited for each new version from then on."""
        bus = self._bus = connect(self.pulsar, "supervisor")
        follower = self._follower = ControlFollower(
            bus, retry_delay_s=self.retry_delay_s, objectives=self.objectives
        )
        await follower.open()
        self._task = asyncio.create_task(follower.run(), name="supervisor:control")
        self._task.add_done_callback(self._follower_ended)

        async def held() -> None:
            await follower.caught_up.wait()
            for objective in self.objectives:
                await follower.wait_for(objective)

        await asyncio.wait_for(held(), timeout_s)

        async def on_change(*_: object) -> None:
            await changed()

        follower.listen(on_change)

    def _follower_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Processes keep running on the last plan; only live changes stop being applied.
            log.error("following the control topic failed", exc_info=task.exception())

    def plan(self) -> list[ProcessSpec]:
        """The processes the configurations held now need, with stable ports."""
        return plan(
            self._configs(),
            self.state_dir,
            self.pulsar.service_url,
            self.pulsar.admin_url,
            self.rendezvous_listen,
            self.ports,
            evaluator=self.evaluator,
            pulsar_env=self.pulsar.security_env(),
            tls=self.tls,
            privacy=self.privacy,
        )

    def write_directory(self, specs: list[ProcessSpec]) -> None:
        """The endpoints of the planned model containers, where live runner hosts look."""
        write_model_directory(self.directory, model_endpoints(specs))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._follower is not None:
            await self._follower.close()
        if self._bus is not None:
            with contextlib.suppress(Exception):
                await self._bus.close()
