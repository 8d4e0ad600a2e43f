"""Hosted repositories: the private-registry side (push, delete, referrers)."""

from proxy.hosted.service import Hosted, UploadLimits

__all__ = ["Hosted", "UploadLimits"]
