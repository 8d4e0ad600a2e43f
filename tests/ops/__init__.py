"""Operating regproxy: metrics, logs, health checks, start-up, shutdown, operator
configuration."""
