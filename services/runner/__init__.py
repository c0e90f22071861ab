"""The model runner: one per model deployment, between the modelling topic and a model.

It consumes enriched tasks (a shared subscription named after the deployment, so
replicas split the load and every deployment sees every task), skips expired
tasks and, for challengers and canaries, tasks whose subject denied
experimentation, calls the model container's `ModelService.Predict` within the
task's deadline and publishes the prediction (or the model's error) to the
task's return address. A task is acknowledged only after its prediction is
published.
"""
