"""The edge: htpasswd users, per-repository access rules, bearer tokens (see ``middleware``)."""

from proxy.auth.middleware import CATALOG_FILTER, REQUEST_USER, install

__all__ = ["CATALOG_FILTER", "REQUEST_USER", "install"]
