"""The HTTP layer: request grammar, ranges, negotiation, error bodies, and property tests of
its inputs."""
