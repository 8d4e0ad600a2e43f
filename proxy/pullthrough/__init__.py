"""Pull-through caching: serve from the store, fill it from the upstream on a miss."""

from proxy.pullthrough.fill import BlobFill
from proxy.pullthrough.service import BlobResult, ManifestResult, PullThrough

__all__ = ["BlobFill", "BlobResult", "ManifestResult", "PullThrough"]
