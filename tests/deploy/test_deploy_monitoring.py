"""Prometheus configuration, alert rules and the Grafana dashboard, checked offline: promtool
parses them, the alerts fire (and stay quiet) on synthetic series, and every `gplr_*` series the
rules and panels query is one the code really exports.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from streams import metrics
from tests.deploy.deploy_helpers import (
    ALERTS,
    DASHBOARD,
    PROMETHEUS_CONFIG,
    alert_rules,
    dashboard,
    dashboard_targets,
    gplr_metrics_in,
    grafana_to_promql,
    run_promtool,
)

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count")}


def exported_series() -> dict[str, str]:
    """Series name → metric family, for every metric the worker and trainer export.

    Built from the registry's families (their types say which suffixes exist) and cross-checked
    against `streams.metrics.metric_names()`, the list the stream code publishes for dashboards.
    """
    names = set(metrics.metric_names())
    series: dict[str, str] = {}
    for family in metrics.REGISTRY.collect():
        assert family.name in names or f"{family.name}_total" in names, family.name
        for suffix in _SUFFIXES[family.type]:
            series[family.name + suffix] = family.name
    return series


def _queries() -> list[tuple[str, str]]:
    """(where, expression) of every alert rule and dashboard query."""
    return ([(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
            + [(f"panel {title!r}", expr) for title, expr in dashboard_targets()])


# -- promtool ---------------------------------------------------------------------------------
def test_prometheus_config_is_valid(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_are_valid(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_broken_rules_and_config_fail(promtool: str, tmp_path: Path) -> None:
    bad_rules = tmp_path / "alerts.yml"
    bad_rules.write_text(ALERTS.read_text().replace("sum by (topic) (gplr_consumer_lag)",
                                                     "sum by (topic) (gplr_consumer_lag", 1))
    assert run_promtool(promtool, "check", "rules", str(bad_rules)).returncode != 0
    bad_config = tmp_path / "prometheus.yml"
    bad_config.write_text(PROMETHEUS_CONFIG.read_text().replace("type: A", "type: NOPE", 1))
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text())
    assert run_promtool(promtool, "check", "config", str(bad_config)).returncode != 0


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel query, as a recording rule, goes through Prometheus's own parser."""
    targets = list(dashboard_targets())
    assert len(targets) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(targets)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- alert behaviour (promtool test rules on synthetic series) ---------------------------------
_ALERT_CASES = {
    # 1 of 10 events per second dead-lettered for 30 minutes: 10% > 1%.
    "GplrDeadLetterRateHigh": ("""
        - series: 'gplr_events_in_total{instance="w1"}'
          values: '0+600x30'
        - series: 'gplr_dlq_total{instance="w1",reason="malformed_json"}'
          values: '0+60x30'
        """, """
        - series: 'gplr_events_in_total{instance="w1"}'
          values: '0+600x30'
        - series: 'gplr_dlq_total{instance="w1",reason="malformed_json"}'
          values: '0+1x30'
        """, {}),
    "GplrConsumerLagHigh": ("""
        - series: 'gplr_consumer_lag{topic="gplr.purchases",partition="0"}'
          values: '20000x30'
        """, """
        - series: 'gplr_consumer_lag{topic="gplr.purchases",partition="0"}'
          values: '50x30'
        """, {"topic": "gplr.purchases"}),
    "GplrLlmErrorRateHigh": ("""
        - series: 'gplr_label_calls_total'
          values: '0+10x30'
        - series: 'gplr_label_errors_total'
          values: '0+5x30'
        """, """
        - series: 'gplr_label_calls_total'
          values: '0+10x30'
        - series: 'gplr_label_errors_total'
          values: '0x30'
        """, {}),
    "GplrLabelBudgetExhausted": ("""
        - series: 'gplr_label_budget_remaining{instance="w1"}'
          values: '0x30'
        """, """
        - series: 'gplr_label_budget_remaining{instance="w1"}'
          values: '12x30'
        """, {}),
    # last success at t=60 s, evaluated 30 h later; quiet: a success at every step, or never
    # trained at all (the gauge's initial 0)
    "GplrTrainerStale": ("""
        - series: 'gplr_trainer_last_success_timestamp_seconds'
          values: '60x450'
        """, ["""
        - series: 'gplr_trainer_last_success_timestamp_seconds'
          values: '0+240x450'
        """, """
        - series: 'gplr_trainer_last_success_timestamp_seconds'
          values: '0x450'
        """], {}),
    # every update slower than 30 s (p99 is then reported as the last finite bound, 30 s)
    "GplrEventToUpdateSlow": ("""
        - series: 'gplr_event_to_update_seconds_bucket{le="10"}'
          values: '0x30'
        - series: 'gplr_event_to_update_seconds_bucket{le="30"}'
          values: '0x30'
        - series: 'gplr_event_to_update_seconds_bucket{le="+Inf"}'
          values: '0+60x30'
        """, """
        - series: 'gplr_event_to_update_seconds_bucket{le="1"}'
          values: '0+60x30'
        - series: 'gplr_event_to_update_seconds_bucket{le="30"}'
          values: '0+60x30'
        - series: 'gplr_event_to_update_seconds_bucket{le="+Inf"}'
          values: '0+60x30'
        """, {}),
}


def _unit_test(alert: str, series: str, eval_time: str, fires: bool, labels: dict,
               interval: str = "1m") -> dict:
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    expected = []
    if fires:
        expected = [{"exp_labels": {**rule.get("labels", {}), **labels}}]
    return {"interval": interval, "input_series": yaml.safe_load(textwrap.dedent(series)),
            "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}]}


@pytest.mark.parametrize("alert", sorted(_ALERT_CASES))
def test_alert_fires_on_trouble_and_not_otherwise(promtool: str, tmp_path: Path, alert: str) -> None:
    bad, good, labels = _ALERT_CASES[alert]
    quiet = good if isinstance(good, list) else [good]
    eval_time, interval, evaluation = "30m", "1m", "1m"
    if alert == "GplrTrainerStale":  # stale means hours: 4-minute steps (within the 5 m lookback)
        eval_time, interval, evaluation = "1800m", "4m", "5m"
    # promtool compares annotations too; they are templates of the value, checked by
    # `promtool check rules` above, so the unit test runs on a copy without them.
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(doc))
    tests = {"rule_files": [str(rules)], "evaluation_interval": evaluation,
             "tests": [_unit_test(alert, bad, eval_time, True, labels, interval)]
                      + [_unit_test(alert, series, eval_time, False, labels, interval) for series in quiet]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_and_documentation() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        uses_gplr = bool(gplr_metrics_in(rule["expr"]))
        assert not uses_gplr or rule["alert"] in _ALERT_CASES, f"{rule['alert']} has no promtool case"


# -- metric names ----------------------------------------------------------------------------
def test_queries_use_only_exported_metrics() -> None:
    exported = exported_series()
    unknown = [(where, name) for where, expr in _queries() for name in sorted(gplr_metrics_in(expr))
               if name not in exported]
    assert not unknown, f"queries of metrics the code does not export: {unknown}"


def test_name_check_catches_a_missing_metric() -> None:
    """The check above is not vacuous: a misspelt or un-suffixed series is reported."""
    exported = exported_series()
    for wrong in ('sum(rate(gplr_events_total[5m]))',                       # misspelt
                  'histogram_quantile(0.9, rate(gplr_event_to_update_seconds[5m]))',  # no _bucket
                  'rate(gplr_persona_changes[5m])'):                        # counter without _total
        assert gplr_metrics_in(wrong) - set(exported), wrong
    assert gplr_metrics_in('up{job="gplr_worker"} + gplr_residual_mass') == {"gplr_residual_mass"}


def test_dashboard_shows_every_exported_metric() -> None:
    shown = {exported_series().get(name) for _, expr in dashboard_targets() for name in gplr_metrics_in(expr)}
    missing = {family.name for family in metrics.REGISTRY.collect()} - shown
    assert not missing, f"no panel shows {sorted(missing)}"


def test_dashboard_is_provisionable() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    datasource = yaml.safe_load((DASHBOARD.parents[1] / "provisioning" / "datasources" / "prometheus.yml")
                                .read_text())["datasources"][0]
    provider = yaml.safe_load((DASHBOARD.parents[1] / "provisioning" / "dashboards" / "gplr.yml")
                              .read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert datasource["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])
    json.dumps(dash)  # round-trips
