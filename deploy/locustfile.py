"""Load test for genrec: /recommend with random histories, plus history writes.

    locust -f deploy/locustfile.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:8000

Item ids to build histories from, first found wins:
  1. GENREC_LOCUST_ITEM_IDS   comma-separated ids, e.g. "B001,B002,B003"
  2. GENREC_LOCUST_ITEMS      path of an items.jsonl (one {"item_id": ...} object per line)
  3. GENREC_BUNDLE_DIR        a bundle folder; its items.jsonl is read
  4. GENREC_MODELS_ROOT       (default ./models) the newest <name>/<version>/items.jsonl in it
Other knobs: GENREC_LOCUST_USERS (distinct user ids, default 1000), GENREC_LOCUST_K (default 10),
GENREC_LOCUST_MAX_HISTORY (default 20).

Traffic mix per simulated user: 6 x POST /recommend with a history in the request, 3 x POST
/recommend by user_id (history read from the store), 1 x POST /users/{id}/events.
Any status other than 200 counts as a failure (429/503 are the service shedding load).

Only loopback targets are accepted (127.0.0.0/8, ::1, localhost): this file is for testing a
local stack, not for load-testing someone else's host.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import socket
from pathlib import Path
from urllib.parse import urlparse

from locust import HttpUser, between, events, task
from locust.exception import StopUser

ITEM_IDS: list[str] = []
N_USERS = int(os.environ.get("GENREC_LOCUST_USERS", "1000"))
K = int(os.environ.get("GENREC_LOCUST_K", "10"))
MAX_HISTORY = int(os.environ.get("GENREC_LOCUST_MAX_HISTORY", "20"))


def _read_items_jsonl(path: Path) -> list[str]:
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids.append(str(json.loads(line)["item_id"]))
    return ids


def _newest_bundle_items(models_root: Path) -> Path | None:
    """items.jsonl of the newest bundle (by manifest created_at, then version) under models_root."""
    best: tuple[str, str, Path] | None = None
    for manifest in models_root.glob("*/*/manifest.json"):
        try:
            created_at = str(json.loads(manifest.read_text()).get("created_at", ""))
        except (OSError, ValueError):
            created_at = ""
        key = (created_at, manifest.parent.name, manifest.parent / "items.jsonl")
        if best is None or key > best:
            best = key
    return best[2] if best else None


def load_item_ids() -> list[str]:
    if ids := os.environ.get("GENREC_LOCUST_ITEM_IDS"):
        return [i.strip() for i in ids.split(",") if i.strip()]
    if path := os.environ.get("GENREC_LOCUST_ITEMS"):
        return _read_items_jsonl(Path(path))
    if bundle := os.environ.get("GENREC_BUNDLE_DIR"):
        return _read_items_jsonl(Path(bundle) / "items.jsonl")
    items = _newest_bundle_items(Path(os.environ.get("GENREC_MODELS_ROOT", "models")))
    if items is None:
        raise RuntimeError(
            "no item ids: set GENREC_LOCUST_ITEM_IDS, GENREC_LOCUST_ITEMS (an items.jsonl) or "
            "GENREC_BUNDLE_DIR (a bundle folder), or put a bundle under ./models"
        )
    return _read_items_jsonl(items)


def is_loopback_host(url: str) -> bool:
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _abort(environment, message: str) -> None:
    logging.error("locustfile: %s", message)
    environment.process_exit_code = 2
    if environment.runner is not None:
        environment.runner.quit()


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    """Check the target and load the item ids once, before any user starts."""
    host = environment.host or ""
    if not is_loopback_host(host):
        _abort(environment, f"refusing to load-test {host!r}: only loopback targets (127.0.0.1, ::1, localhost)")
        return
    if not ITEM_IDS:
        try:
            ITEM_IDS.extend(load_item_ids())
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            _abort(environment, f"cannot load item ids: {exc}")
            return
    if not ITEM_IDS:
        _abort(environment, "the item id list is empty")


class RecommendUser(HttpUser):
    """One simulated client; think time 50-200 ms between calls."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        if not ITEM_IDS or not is_loopback_host(self.host or ""):
            raise StopUser()  # test_start refused the run; it is quitting
        self.user_id = f"locust-{random.randrange(N_USERS)}"
        self.write_events()  # every client records some history first, so by-user requests have one to read

    def _history(self) -> list[str]:
        n = random.randint(1, min(MAX_HISTORY, len(ITEM_IDS)))
        return random.sample(ITEM_IDS, n)

    def _post(self, path: str, payload: dict, name: str) -> None:
        with self.client.post(path, json=payload, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                response.json()
            except ValueError:
                response.failure("response is not JSON")
            else:
                response.success()

    @task(6)
    def recommend_with_history(self) -> None:
        self._post("/recommend", {"history": self._history(), "k": K}, "/recommend [history]")

    @task(3)
    def recommend_by_user(self) -> None:
        self._post("/recommend", {"user_id": self.user_id, "k": K}, "/recommend [user_id]")

    @task(1)
    def write_events(self) -> None:
        items = random.sample(ITEM_IDS, random.randint(1, min(3, len(ITEM_IDS))))
        self._post(f"/users/{self.user_id}/events", {"item_ids": items}, "/users/{id}/events")
