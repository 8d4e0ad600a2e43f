"""Reading a labelled Prometheus counter's current value, for before/after deltas."""

from __future__ import annotations

from proxy import metrics


def counter(metric: object, *labels: object) -> float:
    """The value of ``metric``'s child for ``labels`` (created at 0 if new)."""
    return float(metrics.child(metric, *labels)._value.get())
