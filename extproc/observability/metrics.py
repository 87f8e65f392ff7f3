"""The server's metrics: plain dicts on the hot path, Prometheus families at scrape time.

Written by hand rather than with prometheus-client's Counter/Histogram objects because each of
those takes a lock and walks a label dict per call (~1.5 µs per `.labels(...).inc()`), and a request
records a dozen values (~20 µs, a twentieth of the whole server's cost per request). Here a counter
is a dict keyed by a tuple of label values and a histogram a list of bucket counts (~0.2 µs per
observation, no lock: the event loop is single-threaded). prometheus-client still renders the
exposition format: `MetricsCollector` turns the dicts into its metric families when scraped.

Cardinality is bounded: each family keeps at most `max_series` label sets; later ones are counted
under OVERFLOW label values instead of growing memory (a client choosing model names under a
wildcard route, for example).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

OVERFLOW = "__overflow__"
Labels = tuple[str, ...]


class Counter:
    """Per label set one cell, a one-element list: the observability stage keeps references to the
    cells an exchange adds to (by one lookup of the exchange's labels), not a key tuple per metric."""

    __slots__ = ("doc", "labels", "max_series", "name", "overflow", "series")

    def __init__(self, name: str, doc: str, labels: Labels, max_series: int) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.max_series = max_series
        self.series: dict[Labels, list[float]] = {}
        self.overflow: Labels = (OVERFLOW,) * len(labels)

    def cell(self, key: Labels) -> list[float]:
        """The cell of `key`, made at 0 (the overflow cell once the family holds max_series)."""
        return _slot(self.series, key, self.max_series, self.overflow, 1)

    def inc(self, key: Labels, amount: float = 1.0) -> None:
        (self.series.get(key) or self.cell(key))[0] += amount

    def value(self, key: Labels) -> float:
        cell = self.series.get(key)
        return cell[0] if cell else 0.0

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (value,) in self.series.items():
            fam.add_metric(key, value)
        return fam


class Histogram:
    """Per label set a row: one count per bucket, +Inf's last (not cumulative: summed at scrape),
    then the sum of observations. The count is the buckets' total, also summed at scrape: one update
    fewer per observation."""

    __slots__ = ("bounds", "by_value", "doc", "labels", "max_series", "name", "overflow", "series")

    def __init__(self, name: str, doc: str, labels: Labels, buckets: Iterable[float], max_series: int) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.bounds = tuple(sorted(buckets))
        self.max_series = max_series
        self.series: dict[Labels, list[float]] = {}
        self.overflow: Labels = (OVERFLOW,) * len(labels)
        # One-label families (`observe_each`): the row of each label value, without its key tuple.
        self.by_value: dict[str, list[float]] = {}

    def row(self, key: Labels) -> list[float]:
        """The row of `key`, made empty (the overflow row once the family holds max_series)."""
        return _slot(self.series, key, self.max_series, self.overflow, len(self.bounds) + 2)

    def observe(self, key: Labels, value: float) -> None:
        self.add(self.series.get(key) or self.row(key), value)

    def add(self, row: list[float], value: float) -> None:
        """One observation into a row of this family (the observability stage keeps its rows)."""
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def observe_each(self, values: dict[str, float]) -> None:
        """One observation per entry of a one-label family ({label value: observation}): the
        per-stage times of an exchange, a dozen a request, in one call and no key tuples (half the
        cost of `observe` in a loop; `add` is written out in the loop for the same reason). Finding
        the rows by the whole sequence of labels instead measured slower: hashing the tuple costs
        what the lookups it saves do."""
        rows, bounds = self.by_value, self.bounds
        for label, value in values.items():
            row = rows.get(label)
            if row is None:
                row = self.row((label,))
                if len(rows) < self.max_series:
                    rows[label] = row  # an overflowed label's row is the overflow row: right too
            row[bisect_left(bounds, value)] += 1
            row[-1] += value

    def count(self, key: Labels) -> float:
        row = self.series.get(key)
        return sum(row[:-1]) if row else 0.0

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        n = len(self.bounds)
        for key, row in self.series.items():
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for i in range(n):
                total += row[i]
                buckets.append((_le(self.bounds[i]), total))
            buckets.append(("+Inf", total + row[n]))
            fam.add_metric(key, buckets, row[-1])
        return fam


def _slot(series: dict[Labels, list[float]], key: Labels, max_series: int, overflow: Labels, size: int) -> list[float]:
    """The values of `key` in `series`, made at zeros; past max_series label sets, the overflow's."""
    slot = series.get(key)
    if slot is None:
        if len(series) >= max_series:
            key = overflow
            slot = series.get(key)
        if slot is None:
            slot = series[key] = [0.0] * size
    return slot


def _le(bound: float) -> str:
    return repr(float(bound))


# Buckets of the OpenTelemetry GenAI semantic conventions (their advisory explicit bucket boundaries).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# The gateway's own work per stage is micro- to milliseconds.
STAGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model", "gen_ai_provider_name")


class GatewayMetrics:
    """Every metric the server exports. Values measured per request are recorded here by the
    observability stage; figures other parts already count (the usage sink, the PII stage, Redis
    errors) are read at scrape time through `gauge`/`counter_source` callbacks, at no cost per request."""

    def __init__(self, max_series: int = 2000) -> None:
        m = max_series
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request by type (OpenTelemetry GenAI: gen_ai.client.token.usage).",
            ("gen_ai_token_type", *GENAI_LABELS),
            TOKEN_BUCKETS,
            m,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from the request's arrival to the end of the response (GenAI: gen_ai.server.request.duration).",
            (*GENAI_LABELS, "error_type"),
            DURATION_BUCKETS,
            m,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first output token of streamed responses (GenAI: gen_ai.server.time_to_first_token).",
            GENAI_LABELS,
            TTFT_BUCKETS,
            m,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, streamed responses (GenAI: gen_ai.server.time_per_output_token).",
            GENAI_LABELS,
            TPOT_BUCKETS,
            m,
        )
        self.requests = Counter(
            "gateway_requests",
            "Requests by tenant, public model, provider, HTTP status (0: no response) and error code.",
            ("tenant", "model", "provider", "status", "code"),
            m,
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens by tenant, public model and type.", ("tenant", "model", "type"), m
        )
        self.cost = Counter("gateway_cost_usd", "Cost in USD by tenant and public model.", ("tenant", "model"), m)
        self.auth_refusals = Counter(
            "gateway_auth_refusals", "Requests refused by authentication, by code.", ("code",), m
        )
        self.limit_refusals = Counter("gateway_limit_refusals", "Requests refused by limits, by kind.", ("kind",), m)
        self.cache = Counter(
            "gateway_cache_lookups",
            "Response cache lookups by result (hit, miss, bypass) and public model.",
            ("result", "model"),
            m,
        )
        self.cache_saved = Counter(
            "gateway_cache_saved_usd",
            "What cache hits saved, in USD, by tenant and public model.",
            ("tenant", "model"),
            m,
        )
        self.attempts = Counter(
            "gateway_target_attempts",
            "Attempts Envoy made for models with targets, by model and the target that answered (none: no answer).",
            ("model", "target"),
            m,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Requests to a model with targets answered after more than one attempt, by model and answering target.",
            ("model", "target"),
            m,
        )
        self.translations = Counter(
            "gateway_translations", "Requests translated between schemas, by client and provider schema.", ("pair",), m
        )
        self.stage_time = Histogram(
            "gateway_stage_duration_seconds",
            "Time each stage spent on one exchange (all its hooks).",
            ("stage",),
            STAGE_BUCKETS,
            m,
        )
        self.histograms: tuple[Histogram, ...] = (
            self.token_usage,
            self.duration,
            self.ttft,
            self.tpot,
            self.stage_time,
        )
        self.counters: tuple[Counter, ...] = (
            self.requests,
            self.tokens,
            self.cost,
            self.auth_refusals,
            self.limit_refusals,
            self.cache,
            self.cache_saved,
            self.attempts,
            self.fallbacks,
            self.translations,
        )
        # name -> (doc, callback returning {label values: value}, label names)
        self._gauges: list[tuple[str, str, Labels, Callable[[], dict[Labels, float]]]] = []
        self._sources: list[tuple[str, str, Labels, Callable[[], dict[Labels, float]]]] = []

    def gauge(self, name: str, doc: str, read: Callable[[], float | dict[Labels, float]], labels: Labels = ()) -> None:
        """A value read when scraped (spool size, requests in flight)."""
        self._gauges.append((name, doc, labels, _as_series(read)))

    def counter_source(
        self, name: str, doc: str, read: Callable[[], float | dict[Labels, float]], labels: Labels = ()
    ) -> None:
        """A monotonic count kept elsewhere (e.g. the usage sink's records replayed), read when scraped.
        `name` without the `_total` suffix."""
        self._sources.append((name, doc, labels, _as_series(read)))

    def collect(self) -> Iterator[Metric]:
        for c in self.counters:
            yield c.family()
        for h in self.histograms:
            yield h.family()
        for name, doc, labels, read in self._sources:
            fam = CounterMetricFamily(name, doc, labels=labels)
            for key, value in read().items():
                fam.add_metric(key, value)
            yield fam
        for name, doc, labels, read in self._gauges:
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in read().items():
                gauge.add_metric(key, value)
            yield gauge


def _as_series(read: Callable[[], float | dict[Labels, float]]) -> Callable[[], dict[Labels, float]]:
    def series() -> dict[Labels, float]:
        value = read()
        return value if isinstance(value, dict) else {(): float(value)}

    return series


class MetricsCollector(Collector):
    """Adapts GatewayMetrics to a prometheus-client registry."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect()

    def describe(self) -> list[Any]:
        # Families depend on callbacks: describing them would call every callback at registration.
        return []
