"""dashboards/: every Grafana query names a metric moray defines, and after the session's short
training run and curation (tests/jobs/conftest.py) Ray's metrics endpoint serves every training and
curation metric a dashboard queries, with samples for that run and that output."""

import re
from pathlib import Path

import pytest

from tests.fixtures.prometheus import missing, queried_metrics, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def defined_metrics() -> set[str]:
    """Every metric name moray's code passes to ray.util.metrics."""
    names = set()
    for path in (ROOT / "moray").rglob("*.py"):
        names |= set(re.findall(r'"(moray_[a-z_]+)"', path.read_text()))
    return names


def test_there_are_dashboards_for_training_curation_and_serving():
    assert [d.name for d in DASHBOARDS] == [
        "moray-curation.json",
        "moray-serving.json",
        "moray-training.json",
    ]
    assert (ROOT / "dashboards" / "prometheus.yml").is_file()


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d.stem)
def test_every_query_names_a_metric_moray_defines(dashboard):
    queried = queried_metrics(dashboard)
    assert queried, dashboard.name
    assert queried <= defined_metrics(), queried - defined_metrics()


def test_prometheus_scrapes_rays_service_discovery_file():
    import yaml

    config = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_training_and_curation_metrics_reach_prometheus(ray_local, curated_slice, trained):
    """Each metric the training dashboard queries was served by Ray with a sample for the session's
    training run (scraped by its rank 0 while it ran: a finished worker's series are dropped), and
    each one the curation dashboard queries with a sample for the session's curation output (its
    driver, this process, keeps its gauges current)."""
    *_, summary = trained
    training = {(m, "run", "contract") for m in queried_metrics(ROOT / "dashboards" / "moray-training.json")}
    assert not missing(summary["scrape"], training), sorted(missing(summary["scrape"], training))
    output = curated_slice.out.name
    curation = {(m, "output", output) for m in queried_metrics(ROOT / "dashboards" / "moray-curation.json")}
    sample = wait_for(ray_local.metrics_url, curation)
    assert not missing(sample, curation), sorted(missing(sample, curation))
    # the heatmap has a series per (layer, expert), the step-time breakdown one per phase
    scraped = summary["scrape"]
    loads = {
        (s["layer"], s["expert"]) for s in scraped["moray_train_expert_load"] if s.get("run") == "contract"
    }
    assert len(loads) > 1
    phases = {s["phase"] for s in scraped["moray_train_step_seconds"] if s.get("run") == "contract"}
    assert phases == {"data", "compute", "dispatch", "gradient_mean", "sync", "validation", "checkpoint"}
    outcomes = {s["outcome"] for s in sample["moray_curate_documents"] if s.get("output") == output}
    assert outcomes == {"input", "kept", "filtered", "duplicate", "quarantined"}
