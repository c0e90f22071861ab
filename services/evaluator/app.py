"""The evaluator component (`python -m services.evaluator`): EvaluationService and
FeedbackService on gRPC, and the live dashboard on HTTP (`dashboard_listen`, loopback).

Start order (the common lifecycle, `services.core.lifecycle`): the gRPC server listens
(health NOT_SERVING), the evaluator follows the control topic and, for every objective,
reads its results and feedback topics from the earliest retained message; once caught up
(or after `catch_up_timeout_s`) health turns SERVING and the ready file appears.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from services.core.bus import Bus
from services.core.lifecycle import Component, run
from services.evaluator.dashboard import Dashboard
from services.evaluator.evaluation import Evaluation
from services.evaluator.service import EVALUATION_SERVICE, FEEDBACK_SERVICE, registrar
from services.evaluator.settings import EvaluatorSettings

log = logging.getLogger(__name__)


class EvaluatorComponent(Component):
    """One evaluator process. Pass `bus` to run on a given one (tests)."""

    def __init__(self, settings: EvaluatorSettings, bus: Bus | None = None) -> None:
        self.evaluation = Evaluation(settings)
        super().__init__(
            settings,
            name=f"evaluator-{settings.instance}",
            bus=bus,
            service_names=[EVALUATION_SERVICE, FEEDBACK_SERVICE],
            registrars=[registrar(self.evaluation)],
        )
        self.settings: EvaluatorSettings = settings
        self.dashboard: Dashboard | None = None

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        await self.evaluation.open(self.bus, stack, self.watch)
        if self.settings.dashboard_listen:
            host, _, port = self.settings.dashboard_listen.rpartition(":")
            dashboard = Dashboard(
                self.evaluation.report,
                self.evaluation.names,
                host=host,
                port=int(port),
                refresh_s=self.settings.dashboard_refresh_s,
                default_window_s=self.settings.dashboard_window_s,
            )
            await dashboard.start()
            stack.push_async_callback(dashboard.close)
            self.dashboard = dashboard

    def facts(self) -> dict[str, Any]:
        dashboard = {"dashboard_url": self.dashboard.url} if self.dashboard else {}
        return {**self.evaluation.facts(), **dashboard}


def main() -> None:
    settings = EvaluatorSettings()
    run("evaluator", settings, lambda: EvaluatorComponent(settings))
