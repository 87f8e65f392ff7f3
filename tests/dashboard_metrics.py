"""The metric names a Grafana dashboard queries, for checking them against what the server exports.

A dashboard panel that queries a misspelt or renamed metric shows "No data" and nothing fails, so
the unit tests compare these names with the list the server promises and an end-to-end test with a
real scrape. No PromQL parser ships with the project: this is a small lexer that is exact for the
PromQL a dashboard uses (selectors, functions, aggregations with by/without, binary operators with
on/ignoring/group_*, ranges, subqueries, offset and @), with Grafana's $variables in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["dashboard_exprs", "dashboard_metric_names", "expr_metric_names", "variable_query_metric_names"]

# Identifiers that are never metric names when they stand outside a selector.
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# Grafana variables: $name, ${name}, ${name:format}, [[name]].
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_NAME_MATCHER = re.compile(r'__name__\s*=\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')')
# Label lists: after by/without/on/ignoring, and after group_left/group_right when present.
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_VARIABLE_FUNCTION = re.compile(r"^\s*(label_values|query_result|metrics|label_names)\s*\((.*)\)\s*$", re.DOTALL)


def expr_metric_names(expr: str) -> set[str]:
    """Metric names as written in one PromQL expression (`x_bucket` stays `x_bucket`).

    Label names, functions, aggregations, keywords, durations, numbers and Grafana variables are
    not metric names; a `{__name__="x"}` matcher is.
    """
    names: set[str] = set()
    for literal in _NAME_MATCHER.findall(expr):
        names.add(literal[1:-1])
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub(" ", text)
    text = _SELECTOR.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def variable_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus variable query.

    These are not PromQL: label_values(expr, label) ends with a label name, and metrics(regex) or
    label_names() name no metric at all; query_result(expr) wraps plain PromQL.
    """
    match = _VARIABLE_FUNCTION.match(query)
    if match is None:
        return expr_metric_names(query)
    function, args = match.group(1), match.group(2)
    if function == "label_values":
        selector, _, _label = args.rpartition(",")
        return expr_metric_names(selector)
    if function == "query_result":
        return expr_metric_names(args)
    return set()


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))  # panels folded into a collapsed row
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of every panel target, collapsed rows included."""
    return [t["expr"] for p in _panels(dashboard.get("panels", [])) for t in p.get("targets", []) if t.get("expr")]


def dashboard_metric_names(path: Path | str) -> set[str]:
    """Every metric name the dashboard at `path` queries: panel targets and query variables.

    Names come back exactly as queried (histograms as `<name>_bucket`, `_sum`, `_count`), which is
    how they appear in a scrape.
    """
    dashboard: dict[str, Any] = json.loads(Path(path).read_text())
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        names |= expr_metric_names(expr)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        if text:
            names |= variable_query_metric_names(text)
    return names
