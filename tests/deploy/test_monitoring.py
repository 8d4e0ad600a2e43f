"""The Grafana dashboard and Prometheus alert rules under deploy/: they load, and every
query names only metrics that a running regproxy exports."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxyproc import ProxyProcess

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "regproxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

#: PromQL words that are not metric names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}
#: What each metric type's samples are called, by suffix.
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "untyped": ("",), "unknown": ("",), "stateset": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    check_balanced(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and other strings
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue  # a function or aggregation, or an operator
        names.add(word)
    return names


def check_balanced(expr: str) -> None:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', "", expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
    assert not stack, f"unclosed {stack} in {expr!r}"


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert m, f"variable {var['name']}: {query}"
            yield f"variable {var['name']}", m.group(1)


def alert_rules(rules: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rules["groups"]:
        yield from group["rules"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name a running ``regproxy serve`` exports on /metrics."""
    tmp = tmp_path_factory.mktemp("deploy")
    with ProxyProcess(tmp / "p", "--upstream", "http://127.0.0.1:9",
                      "--data-dir", str(tmp / "data")) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{proxy.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    return names


def test_dashboard_loads_and_queries_only_exported_metrics(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    inputs = {i["name"] for i in dashboard["__inputs"]}
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 20
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: names no metric: {expr}"
        assert names <= exported, f"{where}: not exported: {sorted(names - exported)}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"].strip("${}") in inputs
    used = {n for _, expr in queries for n in metric_names(expr)}
    for wanted in ("regproxy_request_duration_seconds_bucket", "regproxy_bytes_saved_total",
                   "regproxy_fills_in_flight", "regproxy_disk_free_bytes", "regproxy_build_info",
                   "regproxy_store_size_bytes", "regproxy_circuit_breaker_open"):
        assert wanted in used, wanted


def test_alert_rules_load_and_query_only_exported_metrics(exported):
    rules = yaml.safe_load(ALERTS.read_text())
    seen = set()
    for rule in alert_rules(rules):
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z]+", name) and name not in seen, name
        seen.add(name)
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert re.fullmatch(r"\d+[smhd]", rule["for"]), name
        names = metric_names(rule["expr"])
        assert names, f"{name} names no metric"
        assert names <= exported, f"{name}: not exported: {sorted(names - exported)}"
    # what an operator must hear about
    assert {"RegproxyUpstreamBreakerOpen", "RegproxyHitRatioLow", "RegproxyDiskAlmostFull",
            "RegproxyFillErrors"} <= seen


def test_metric_names_are_found_in_promql():
    """The extraction the two tests above rely on."""
    assert metric_names('sum by (le, route) (rate(a_bucket{x="b(c"}[5m])) / on(i) b > 0.5') == {
        "a_bucket", "b"}
    assert metric_names("histogram_quantile(0.9, x) and y offset 1d unless z bool") == {"x", "y", "z"}
    with pytest.raises(AssertionError):
        metric_names("sum(rate(x[5m])")
