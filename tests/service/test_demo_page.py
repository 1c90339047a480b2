"""The demo page: its helper routes in-process, then the page itself in headless Chromium (Debian's
chromium + chromedriver, driven by selenium) against the real service process on loopback."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.app import create_app
from service.bundle import Bundle
from service.config import Settings

BROWSER_WAIT_S = 20


@pytest.fixture(scope="module")
def users_file(demo_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset-style sequences file over the demo catalog: user-a and user-b, plus a user whose
    items are all unknown (left out of the picker)."""
    ids = demo_bundle.item_ids
    path = tmp_path_factory.mktemp("demo-users") / "sequences.txt"
    path.write_text(f"user-a {ids[1]} {ids[2]} {ids[3]} {ids[4]}\n"
                    f"user-b {ids[5]} nope {ids[6]}\n"
                    f"user-c nope-1 nope-2\n")
    return path


@pytest.fixture(scope="module")
def client(demo_bundle_dir: Path, users_file: Path) -> Iterator[TestClient]:
    settings = Settings(bundle_dir=demo_bundle_dir, onnx_providers="cpu", demo_users_file=users_file)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


# --- the helper routes --------------------------------------------------------------------------

def test_root_serves_the_page(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'id="recs"' in response.text


def test_item_search_by_title_or_id(client: TestClient, demo_bundle: Bundle) -> None:
    title = demo_bundle.titles[7]
    found = client.get("/demo/items", params={"q": title.upper()}).json()
    assert {"item_id": demo_bundle.item_ids[7], "title": title} in found
    assert all(title.lower() in (f["title"] + " " + f["item_id"]).lower() for f in found)
    assert len(client.get("/demo/items", params={"q": demo_bundle.titles[0][:1], "limit": 3}).json()) <= 3
    assert client.get("/demo/items", params={"q": ""}).status_code == 422


def test_users_from_the_sequences_file(client: TestClient, demo_bundle: Bundle) -> None:
    assert client.get("/demo/users").json() == [{"user_id": "user-a", "items": 4}, {"user_id": "user-b", "items": 2}]
    user = client.get("/demo/users/user-a").json()
    ids = demo_bundle.item_ids
    assert [i["item_id"] for i in user["past"]] == [ids[1], ids[2], ids[3]]
    assert user["held_out"] == {"item_id": ids[4], "title": demo_bundle.titles[4]}
    assert client.get("/demo/users/user-c").status_code == 404


def test_history_is_readable_for_demo_users_only(client: TestClient, demo_bundle: Bundle) -> None:
    ids = demo_bundle.item_ids[:2]
    for user in ("demo-x1", "alice"):
        assert client.post(f"/users/{user}/events", json={"item_ids": ids}).status_code == 200
    history = client.get("/demo/history/demo-x1").json()
    assert history == {"user_id": "demo-x1", "items": [{"item_id": i, "title": demo_bundle.titles[n]} for n, i in enumerate(ids)]}
    assert client.get("/demo/history/alice").status_code == 403


def test_the_page_can_be_switched_off(demo_bundle_dir: Path) -> None:
    settings = Settings(bundle_dir=demo_bundle_dir, onnx_providers="cpu", demo_page=False)
    with TestClient(create_app(settings)) as off:
        assert off.get("/").status_code == 404
        assert off.get("/demo/items", params={"q": "a"}).status_code == 404
        assert off.get("/health/ready").status_code == 200


# --- the page in a real browser -----------------------------------------------------------------

def chromium() -> webdriver.Chrome:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("chromium and chromedriver are not installed: `make system-deps` "
                    "(apt-get install -y chromium chromium-driver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=ChromeService(executable_path=driver), options=options)


def item_ids(browser: webdriver.Chrome, list_id: str) -> list[str]:
    try:
        return [li.get_attribute("data-item-id") for li in browser.find_elements(By.CSS_SELECTOR, f"#{list_id} > li")]
    except StaleElementReferenceException:  # the list was re-rendered while read: read again
        return item_ids(browser, list_id)


@pytest.mark.slow
def test_the_page_in_chromium(start_service, demo_bundle_dir: Path, demo_bundle: Bundle, users_file: Path,
                              redis_server: str, tmp_path: Path) -> None:
    base_url = start_service(demo_bundle_dir, redis_url=redis_server,
                             env={"GENREC_ONNX_PROVIDERS": "cpu", "GENREC_DEMO_USERS_FILE": str(users_file)})
    ids = demo_bundle.item_ids
    browser = chromium()
    wait = WebDriverWait(browser, BROWSER_WAIT_S)
    try:
        browser.get(base_url + "/")
        wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
        assert demo_bundle.version in browser.find_element(By.ID, "model").text
        assert item_ids(browser, "history") == [] and len(item_ids(browser, "recs")) == 10  # popular for a new user

        # A dataset user: the past is written as events, the held-out item shown.
        Select(browser.find_element(By.ID, "user-select")).select_by_value("user-a")
        wait.until(lambda b: item_ids(b, "history") == [ids[1], ids[2], ids[3]])
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("started from"))
        assert demo_bundle.titles[4] in browser.find_element(By.ID, "held-out").text
        session = browser.find_element(By.ID, "session").text
        assert session.startswith("demo-user-a-")
        before = item_ids(browser, "recs")
        with httpx.Client(base_url=base_url, timeout=10) as api:  # the page shows what the API answers
            by_user = api.post("/recommend", json={"user_id": session, "k": 10}).json()
        assert before == [i["item_id"] for i in by_user["items"]]
        assert "generative" in browser.find_element(By.ID, "strategy").text

        # Clicking a recommendation records it and the recommendations follow.
        clicked = before[0]
        browser.find_element(By.CSS_SELECTOR, "#recs > li .pick").click()
        wait.until(lambda b: item_ids(b, "history")[-1:] == [clicked])
        after = item_ids(browser, "recs")
        assert clicked not in after and after != before
        with httpx.Client(base_url=base_url, timeout=10) as api:
            stored = api.get(f"/demo/history/{session}").json()["items"]
        assert [i["item_id"] for i in stored] == [ids[1], ids[2], ids[3], clicked]

        # Typing part of a title finds items; clicking one adds it.
        browser.find_element(By.ID, "search").send_keys(demo_bundle.titles[9])
        wait.until(lambda b: ids[9] in item_ids(b, "search-results"))
        browser.find_element(By.CSS_SELECTOR, f'#search-results > li[data-item-id="{ids[9]}"]').click()
        wait.until(lambda b: item_ids(b, "history")[-1:] == [ids[9]])
        browser.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        browser.quit()
