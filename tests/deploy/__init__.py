"""Deployment artefacts under deploy/: the container image, compose, Kubernetes, systemd,
dashboards and alerts."""
