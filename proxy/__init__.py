"""regproxy: a pull-through caching proxy and private registry for container images."""

__version__ = "0.1.0"
