"""The OpenAPI spec tells the truth: its examples are accepted, every status a route returns is
documented with the error model, and schemathesis finds no failure against the live service."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle
from tests.service.test_api import make_settings

KEY = "test-key"
GUARDED = [("post", "/recommend"), ("post", "/users/{user_id}/events")]


def concrete(path: str) -> str:
    return path.replace("{user_id}", "openapi-user")


def documented(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return schema["paths"][path][method]["responses"]


@pytest.fixture
def keyed_client(demo_bundle_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(demo_bundle_dir, api_keys=KEY, client_rate_per_s=0.001, client_burst=1000,
                             max_body_bytes=1024, request_read_timeout_s=0.5)
    with TestClient(create_app(settings)) as client:
        yield client


def test_every_openapi_example_is_accepted(keyed_client: TestClient, demo_bundle: Bundle) -> None:
    schema = keyed_client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    posted = 0
    for method, path in GUARDED:
        request_schema = schema["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        examples = components[request_schema["$ref"].rsplit("/", 1)[1]]["examples"]
        for example in examples:
            response = keyed_client.post(concrete(path), json=example, headers={"X-API-Key": KEY})
            assert 200 <= response.status_code < 300, (path, example, response.text)
            posted += 1
    assert posted >= 3
    # the examples name items of the served bundle
    events_example = components["EventsRequest"]["examples"][0]
    assert all(item in demo_bundle.index_of for item in events_example["item_ids"])


def test_every_status_a_route_returns_is_documented_with_the_error_model(demo_bundle_dir: Path,
                                                                        demo_bundle: Bundle) -> None:
    item = demo_bundle.item_ids[0]
    bodies = {"/recommend": {"history": [item], "k": 3}, "/users/{user_id}/events": {"item_ids": [item]}}
    seen: set[tuple[str, str, int]] = set()
    # Buckets are per key: each request below takes a fresh key, but the rate-limit phase spends one.
    keys = [f"key-{n}" for n in range(64)]
    fresh = iter(keys)
    app = create_app(make_settings(demo_bundle_dir, api_keys=",".join(keys), client_rate_per_s=0.001, client_burst=2,
                                   max_body_bytes=1024, request_read_timeout_s=0.5))

    def record(method: str, path: str, status: int) -> None:
        seen.add((method, path, status))

    outside = TestClient(app)  # before startup: 503 everywhere that needs the bundle
    for method, path in GUARDED:
        record(method, path, outside.post(concrete(path), json=bodies[path], headers={"X-API-Key": next(fresh)})
               .status_code)
    record("get", "/info", outside.get("/info").status_code)
    record("get", "/health/ready", outside.get("/health/ready").status_code)

    with TestClient(app) as client:
        for method, path in GUARDED:
            url, good = concrete(path), bodies[path]
            as_json = {"Content-Type": "application/json"}
            record(method, path, client.post(url, json=good, headers={"X-API-Key": next(fresh)}).status_code)
            record(method, path, client.post(url, json=good).status_code)
            record(method, path, client.post(url, json=good, headers={"X-API-Key": "wrong"}).status_code)
            record(method, path, client.post(url, content=b"{", headers={"X-API-Key": next(fresh)} | as_json).status_code)
            record(method, path, client.post(url, json={"nope": 1}, headers={"X-API-Key": next(fresh)}).status_code)
            record(method, path, client.post(url, content=b"[" + b"1," * 1024 + b"1]",
                                             headers={"X-API-Key": next(fresh)} | as_json).status_code)
            # 408 (a body slower than the read timeout) needs a real socket: test_server_process.py
            record(method, path, 408)
            spender = {"X-API-Key": next(fresh)}
            for _ in range(3):  # burst 2, then over the rate
                record(method, path, client.post(url, json=good, headers=spender).status_code)
        for path in ("/health/live", "/health/ready", "/info", "/metrics"):
            record("get", path, client.get(path).status_code)
        schema = client.get("/openapi.json").json()

    statuses = {status for *_, status in seen}
    assert {200, 400, 401, 403, 413, 422, 429, 503} <= statuses, sorted(statuses)  # each was provoked
    for method, path, status in sorted(seen):
        responses = documented(schema, method, path)
        assert str(status) in responses, f"{method.upper()} {path} returned {status}, not in the spec"
        if status >= 400 and path not in ("/health/ready",):
            ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (path, status, ref)


@pytest.mark.slow
def test_schemathesis_finds_no_failure_against_the_live_service(start_service, demo_bundle_dir: Path,
                                                               redis_server: str) -> None:
    """Generated valid and invalid requests for every operation (bounded), checked against the spec:
    no 5xx, only documented statuses, content types and response bodies as documented, invalid
    input refused. Not checked: positive_data_acceptance, since schema-valid events may name items
    the catalog does not have (422 by design)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi import checks

    base_url = start_service(demo_bundle_dir, redis_url=redis_server, env={"GENREC_ONNX_PROVIDERS": "cpu"})
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    # Invalid data can also be a body over GENREC_MAX_BODY_BYTES (long generated lists, nested filters):
    # it is refused with 413 before it is parsed, which is a rejection too.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    selected = [checks.status_code_conformance, checks.content_type_conformance, checks.response_headers_conformance,
                checks.response_schema_conformance, checks.negative_data_rejection]
    from schemathesis.checks import not_a_server_error

    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        has_inputs = any(len(part) for part in (operation.body, operation.path_parameters, operation.query,
                                                operation.headers))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_inputs else (GenerationMode.POSITIVE,):

            @settings(max_examples=15, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=base_url, checks=[not_a_server_error, *selected])

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (e.g. only a free-text path parameter)
                assert mode == GenerationMode.NEGATIVE, operation.label
    assert calls >= 60
