"""docker-compose's Prometheus and Grafana (files only: no Docker needed): the mounted files exist, every
scrape target is a service of the compose file on the port it serves metrics on, and the provisioned
Grafana dashboard is well formed, uses the data source variable everywhere (so it also imports by hand)
and queries only metrics that docs/metrics.md documents."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/llm-gateway.json").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def _panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_mounted_files_exist(service: str) -> None:
    for volume in COMPOSE["services"][service]["volumes"]:
        source = volume.split(":", 1)[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{service} mounts {source}, which is not in the repo"


def test_scrape_targets_are_services_on_their_metrics_ports() -> None:
    services = COMPOSE["services"]
    env = COMPOSE["x-gateway"]["environment"]
    for job in PROMETHEUS["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services and host == "api" and port == "8080", target
        for dns in job.get("dns_sd_configs", []):
            assert str(dns["port"]) == env["GATEWAY_WORKER_METRICS_PORT"]
            for name in dns["names"]:
                assert name in services and "worker" in services[name]["command"], name


def test_dashboard_is_well_formed() -> None:
    panels = _panels()
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        # the data source is the dashboard's variable: provisioned or imported by hand, it resolves
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "provider", "model"} <= names


def test_dashboard_queries_only_documented_metrics() -> None:
    doc = ROOT / "docs" / "metrics.md"
    if not doc.exists():
        pytest.skip("docs/metrics.md (the metrics branch's table of names) is not on this branch yet")
    documented = set(re.findall(r"^\| `(gateway_[a-z_]+)`", doc.read_text(), re.MULTILINE))
    used = {re.sub(r"(_bucket|_sum|_count)$", "", name) for e in _exprs()
            for name in re.findall(r"\bgateway_[a-z_]+", e)}
    assert used <= documented, used - documented
