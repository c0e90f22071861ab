"""The control component: the control plane as a process (`python -m services.control`).

Start order (the common lifecycle, `services.core.lifecycle`): the gRPC server listens
(health NOT_SERVING, ControlPlaneService answers UNAVAILABLE), the plane takes the control
topic's exclusive producer (waiting as a standby while another instance holds it), sets the
topic's policies, catches up with the topic (current state, history, runner status) and
seeds version 1 of each objective of its mesh file that the topic lacks; only then does
health turn SERVING and the ready file appear. The ready file says which objectives it
seeded and which ones the topic serves differently from the mesh file (`mesh_file_differs`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from services.control.admin import PulsarAdmin, TopicAdmin
from services.control.plane import ControlPlane
from services.control.service import SERVICE_NAME, ControlPlaneServicer, registrar
from services.control.settings import ControlSettings
from services.core.bus import Bus
from services.core.lifecycle import Component, run

log = logging.getLogger(__name__)


class ControlComponent(Component):
    """One control-plane process. Pass `bus` (and `admin`) to run on given ones (tests)."""

    def __init__(
        self, settings: ControlSettings, bus: Bus | None = None, admin: TopicAdmin | None = None
    ) -> None:
        if admin is None:
            admin = PulsarAdmin(
                settings.pulsar,
                timeout_s=settings.admin_timeout_s,
                attempts=settings.admin_attempts,
                retry_s=settings.retry_delay_s,
            )
        self.plane = ControlPlane(settings, admin)
        super().__init__(
            settings,
            name=f"control-{settings.instance}",
            bus=bus,
            service_names=[SERVICE_NAME],
            registrars=[registrar(ControlPlaneServicer(self.plane))],
        )
        self.settings: ControlSettings = settings

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        """Returns once the plane has caught up with the topic and seeded it."""
        await self.plane.open(self.bus, stack, self.watch)

    async def drain(self) -> None:
        # Updates in flight finish under the lock; new ones are refused from here on.
        self.plane.ready = False

    def facts(self) -> dict[str, Any]:
        return self.plane.facts()


def main() -> None:
    settings = ControlSettings()
    run("control", settings, lambda: ControlComponent(settings))
