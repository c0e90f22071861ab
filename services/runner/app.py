"""`python -m services.runner`: a runner host for the deployments its settings name.

The host (`services.runner.host`) receives each task once and fans it out to its model
runners (`services.runner.runner`): admission (`admission`), the model call
(`model_client`), the prediction event (`events`), and, when the decoy is hosted, the
archive (`services.decoy.archive`).
"""

from __future__ import annotations

from services.core.lifecycle import run
from services.runner.host import RunnerHost
from services.runner.settings import RunnerSettings


def main() -> None:
    # objective, model, role and endpoint (or deployments) come from the environment or YAML.
    settings = RunnerSettings()
    run("runner", settings, lambda: RunnerHost(settings))
