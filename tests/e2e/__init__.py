"""End to end with real clients (dockerd, containerd, podman, skopeo) and a real docker-
registry, and self-tests of that harness."""
