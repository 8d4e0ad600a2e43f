"""Per-upstream policy building blocks: allow/deny rules, caps, cosign signatures, the tag
names of attached artifacts (proxy/policy/)."""
