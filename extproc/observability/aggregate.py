"""One /metrics for N worker processes: the supervisor scrapes each worker and adds them up.

Why not prometheus-client's multiprocess mode: most of the server's series are read at scrape
time from figures other parts already keep (callbacks: spool counters, in-flight requests, the
bounded-series collector), which multiprocess mode cannot serve, and it would put a file write
on every observation of the hot path. A scrape of N workers costs N local HTTP requests instead,
once per scrape interval.

Counters and histograms are summed. Gauges are summed too (requests in flight, open streams,
body bytes held), except those that describe something the workers share or the build: the max.
A worker that is restarting is missing from the sum for a scrape, which Prometheus' rate()
treats as a counter reset; `gateway_worker_up` says which one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The usage spool is one directory for every process of a host (each worker reports its size);
# the build is the same in every worker; the ledger backlog is Redis' (each worker's consumer
# measures the same streams).
SHARED_GAUGES = frozenset({"gateway_usage_spool_bytes", "gateway_build_info", "gateway_ledger_backlog_records"})

_Key = tuple[str, tuple[tuple[str, str], ...]]


class _Families:
    """A collector that yields fixed families (what generate_latest renders)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(texts: Iterable[str], extra: Iterable[Metric] = ()) -> bytes:
    """The sum of several Prometheus text expositions, plus `extra` families, as one exposition."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            shared = fam.type == "gauge" and fam.name in SHARED_GAUGES
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = acc.get(key)
                if old is None:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(old, s.value)  # when the series first existed in any worker
                elif shared:
                    acc[key] = max(old, s.value)
                else:
                    acc[key] = old + s.value
    for name, fam in families.items():
        fam.samples = [Sample(sname, dict(labels), v) for (sname, labels), v in values[name].items()]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *extra]))
    return generate_latest(registry)
