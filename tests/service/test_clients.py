"""API keys, per-client token buckets and CORS, in process (the socket-level limits are in
test_server_process.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.clients import ApiKeys, TokenBuckets, is_guarded_path
from tests.service.test_api import make_settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_keys_come_from_the_setting_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2026-12\nfile-key\n\n  spaced-key  \n")
    keys = ApiKeys.from_settings(" a , b,,", keys_file)
    assert len(keys) == 4 and keys.enabled
    assert all(keys.accepts(k) for k in ("a", "b", "file-key", "spaced-key"))
    assert not keys.accepts("# rotated 2026-12") and not keys.accepts("") and not keys.accepts("a ")
    assert not ApiKeys.from_settings("", None).enabled
    with pytest.raises(ValueError, match="GENREC_API_KEYS_FILE .* cannot be read"):
        ApiKeys.from_settings("", tmp_path / "missing")


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=2.0, burst=3, clock=clock)
    assert [buckets.take("c1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("c1") == pytest.approx(0.5)  # empty: the next token in 1/rate s
    assert buckets.take("c2") == 0.0  # another client has its own bucket
    clock.now += 0.5
    assert buckets.take("c1") == 0.0
    clock.now += 100
    assert [buckets.take("c1") for _ in range(4)][-1] > 0  # refills to the burst, not beyond


def test_buckets_are_bounded_in_clients() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=1, max_clients=2, clock=FakeClock())
    for client in ("a", "b", "c"):
        buckets.take(client)
    assert buckets.take("a") == 0.0  # dropped as least recently seen: starts full again
    assert buckets.take("c") > 0


@pytest.mark.parametrize(("path", "guarded"), [("/recommend", True), ("/users/u1/events", True), ("/users/u1/events/", True),
                                               ("/health/ready", False), ("/metrics", False), ("/info", False),
                                               ("/users/a/b/events", False), ("/docs", False)])
def test_the_guarded_routes(path: str, guarded: bool) -> None:
    assert is_guarded_path(path) is guarded


def test_without_keys_the_routes_are_open_and_a_warning_says_so(demo_bundle_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service"):
        with TestClient(create_app(make_settings(demo_bundle_dir))) as client:
            assert client.post("/recommend", json={"k": 3}).status_code == 200
            assert "access-control-allow-origin" not in client.options(
                "/recommend", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
            ).headers
    assert any("no API keys configured" in record.getMessage() for record in caplog.records)


def test_cors_allows_the_configured_origins_before_the_key_check(demo_bundle_dir: Path) -> None:
    settings = make_settings(demo_bundle_dir, cors_origins="https://shop.example", api_keys="k1")
    with TestClient(create_app(settings)) as client:
        preflight = client.options("/recommend", headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        other = client.options("/recommend", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        answered = client.post("/recommend", json={"k": 3}, headers={"Origin": "https://shop.example", "X-API-Key": "k1"})
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://shop.example"
