"""The edge: htpasswd users, per-repository access rules, bearer tokens, and the middleware
that checks them (:func:`proxy.auth.middleware.install`). Their settings are
:mod:`proxy.settings.auth`."""
