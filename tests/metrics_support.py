"""Reading Prometheus counters in tests: what a step added to each labelled series."""

from __future__ import annotations

from prometheus_client import Counter

Series = dict[tuple[str, ...], float]


def series(counter: Counter) -> Series:
    """The value of every labelled series of ``counter``, by its label values."""
    return {
        tuple(sample.labels.values()): sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def added(counter: Counter, before: Series) -> Series:
    """What each series of ``counter`` gained since ``before`` (:func:`series`), the unchanged
    left out."""
    return {k: v - before.get(k, 0.0) for k, v in series(counter).items() if v != before.get(k)}
