"""What may reach an upstream, and how fast: per-upstream allow/deny rules
(:mod:`proxy.policy.rules`), request and bandwidth caps (:mod:`proxy.policy.limits`),
cosign signature checks (:mod:`proxy.policy.signatures`) and the tag names of attached
artifacts (:mod:`proxy.policy.referrers`).

Building blocks below the pull-through layer: they import only the grammar, the error types,
the config error and parsers of :mod:`proxy.config`, and ``cryptography``; never a handler,
a service, a store or an upstream client.
"""
