"""Pull-through: fills and their failures, single flight across workers and replicas,
upstream faults, shared metadata, upstreams named by host:port or behind an egress proxy."""
