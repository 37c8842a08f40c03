"""kube.py's client plumbing: the token refresh hook of the Kubernetes client, throttled."""

from __future__ import annotations

from typing import Any

from kubetune.operator.kube import _at_most_every


def test_token_refresh_runs_at_most_once_per_interval_though_the_loader_reinstalls_it() -> None:
    """The kubeconfig loader's hook re-reads the whole configuration (proxies from the
    environment included) on every request and installs itself again; the operator runs it at
    most every few seconds."""
    calls: list[int] = []

    class Configuration:
        refresh_api_key_hook: Any = None

    def loader_hook(configuration: Any) -> None:
        calls.append(1)
        configuration.refresh_api_key_hook = loader_hook  # as kube_config._set_config does

    configuration = Configuration()
    configuration.refresh_api_key_hook = _at_most_every(60.0, loader_hook)
    for _ in range(5):
        configuration.refresh_api_key_hook(configuration)
    assert calls == [1]
    assert configuration.refresh_api_key_hook is not loader_hook

    configuration.refresh_api_key_hook = _at_most_every(0.0, loader_hook)
    for _ in range(3):
        configuration.refresh_api_key_hook(configuration)
    assert len(calls) == 4
