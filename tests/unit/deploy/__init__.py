"""Tests of the container images and the Helm chart, without Docker or a cluster."""
