"""The common core every component is built from: settings, server lifecycle, the
Pulsar adapter, telemetry, errors and topic naming."""
