"""Hosted repositories: the private-registry side (push, delete, referrers)."""

from proxy.hosted.service import Hosted

__all__ = ["Hosted"]
