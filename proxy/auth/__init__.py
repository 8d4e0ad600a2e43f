"""The edge: htpasswd users, per-repository access rules, bearer tokens (see ``middleware``)."""

from proxy.auth.middleware import CATALOG_FILTER, install

__all__ = ["CATALOG_FILTER", "install"]
