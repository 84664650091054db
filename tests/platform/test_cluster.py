"""connect(): where a local Ray's node address comes from, and that the switch which keeps it on
loopback does not outlive `ray.init` (a later connection to a cluster from the same process sees
Ray's own setting). The listening sockets themselves: tests/jobs/serve/test_listeners.py."""

import os

import pytest
from ray._private import ray_constants

from moray.platform import cluster


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init recorded instead of run: its kwargs and what Ray would read for the node address."""
    import ray

    calls = []

    def init(**kwargs):
        calls.append((kwargs, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR),
                      ray_constants.ENABLE_RAY_CLUSTER))  # fmt: skip

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr("ray._private.services.canonicalize_bootstrap_address", lambda *a: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(cluster.NODE_IP_VARIABLE, raising=False)
    monkeypatch.delenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, raising=False)
    return calls


def test_local_ray_is_on_loopback_and_the_switch_is_put_back(fake_ray):
    flag = ray_constants.ENABLE_RAY_CLUSTER
    cluster.connect(num_cpus=2)
    assert fake_ray == [({"num_cpus": 2}, "0", False)]  # Ray keeps 127.0.0.1 as the node IP
    assert ray_constants.ENABLE_RAY_CLUSTER == flag
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in os.environ


def test_a_configured_node_ip_is_given_to_ray(fake_ray, monkeypatch):
    monkeypatch.setenv(cluster.NODE_IP_VARIABLE, "10.1.2.3")
    cluster.connect()
    assert fake_ray == [({"_node_ip_address": "10.1.2.3"}, None, ray_constants.ENABLE_RAY_CLUSTER)]


def test_ray_address_joins_that_cluster_with_its_settings(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    cluster.connect(num_cpus=2)
    assert fake_ray == [({"address": "10.1.2.3:6379"}, None, ray_constants.ENABLE_RAY_CLUSTER)]


def _unset(monkeypatch, names) -> None:
    """Unset now and restored afterwards, however the test sets them meanwhile."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_a_local_ray_inherits_morays_ray_settings_unless_set(fake_ray, monkeypatch):
    _unset(monkeypatch, cluster.RAY_ENVIRONMENT)
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")  # a user's choice stands
    cluster.connect()
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "0"
    monkeypatch.delenv("RAY_SERVE_PROXY_USE_GRPC")
    cluster.connect()
    assert {name: os.environ.get(name) for name in cluster.RAY_ENVIRONMENT} == cluster.RAY_ENVIRONMENT


def test_a_cluster_by_address_keeps_its_own_environment(fake_ray, monkeypatch):
    _unset(monkeypatch, cluster.RAY_ENVIRONMENT)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    cluster.connect()
    assert not any(name in os.environ for name in cluster.RAY_ENVIRONMENT)
