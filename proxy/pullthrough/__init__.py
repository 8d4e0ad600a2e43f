"""Pull-through caching: serve from the store, fill it from the upstream on a miss."""

from proxy.pullthrough.service import PullThrough, WarmProgress

__all__ = ["PullThrough", "WarmProgress"]
