"""The runs read well in the MLflow UI: a real ``mlflow server`` on loopback, opened in headless Chromium.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run`` installs
them when missing) and selenium (the ``test`` extra). The screenshot is kept in ``$FREEZEBENCH_ARTIFACTS``
(default ``tests/artifacts/``) as ``mlflow_ui_runs.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

ARTIFACTS = Path(os.environ.get("FREEZEBENCH_ARTIFACTS") or Path(__file__).parent / "artifacts")


def _find(env: str, names: list[str], extra: list[str]) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for n in names:
        if shutil.which(n):
            return shutil.which(n)
    return next((p for p in extra if os.access(p, os.X_OK)), None)


CHROMIUM = _find("FREEZEBENCH_CHROMIUM", ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"], [])
DRIVER = _find("FREEZEBENCH_CHROMEDRIVER", ["chromedriver"], ["/usr/lib/chromium/chromedriver"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(compare_runs, tmp_path):
    """``mlflow server`` over the session store on 127.0.0.1:<free port>; stopped (its process group) after."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", compare_runs["uri"], "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="no Chromium/chromedriver found (apt-get install chromium chromium-driver, or set "
                           "FREEZEBENCH_CHROMIUM / FREEZEBENCH_CHROMEDRIVER)")
def test_runs_and_a_compared_metric_are_visible_in_the_mlflow_ui(compare_runs, mlflow_server):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e .[test]")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    client = mlflow.tracking.MlflowClient(compare_runs["uri"])
    exp = client.get_experiment_by_name(compare_runs["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.suite = 't'")
    acc = {r.info.run_name: r.data.metrics["val/acc"] for r in runs}
    assert len(acc) == 6
    # the experiment's runs of suite t, sorted by val/acc: all in the URL, as a user would bookmark it
    query = urllib.parse.urlencode({"searchFilter": "tags.suite = 't'", "orderByKey": "metrics.`val/acc`",
                                    "orderByAsc": "false"}, quote_via=urllib.parse.quote)
    url = f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?{query}"

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1000"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    wait = WebDriverWait(driver, 60)
    body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        driver.get(url)
        wait.until(lambda d: "6 matching runs" in body())
        # every run of the suite is listed by its readable name (rows render after the count)
        wait.until(lambda d: all(name in body() for name in acc))
        # show the val/acc column through the Columns menu
        driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']"))
        box.send_keys("val/acc")
        wait.until(lambda d: d.find_element(By.XPATH, "//span[normalize-space(.)='val/acc']")).click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        # the assistant side panel takes a third of the width: close it so the metric column is in view
        for button in driver.find_elements(By.XPATH, "//*[normalize-space(text())='MLflow Assistant']/following::button"
                                                     "[@aria-label='Close' or .//*[contains(@class,'close')]][1]"):
            button.click()
        cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".ag-center-cols-container [col-id*='val/acc']"))
        # each table row (ag-grid: pinned and centre parts share row-index) holds a run name and its val/acc
        rows: dict[str, list[str]] = {}
        for el in driver.find_elements(By.CSS_SELECTOR, ".ag-row[row-index]"):
            rows.setdefault(el.get_attribute("row-index"), []).append(el.text)
        shown = []
        for idx in sorted(rows, key=int):
            text = " ".join(rows[idx])
            name = next(n for n in acc if n in text.split())
            cell = next(c for c in cells if c.find_element(By.XPATH, "./ancestor::*[@row-index]").get_attribute("row-index") == idx)
            shown.append((name, float(cell.text)))
        for name, value in shown:
            assert value == pytest.approx(acc[name], abs=5e-5), name
        assert [n for n, _ in shown] == sorted(acc, key=lambda n: -acc[n]) or \
            [v for _, v in shown] == sorted(acc.values(), reverse=True)  # sorted by val/acc, ties in any order
        driver.execute_script("arguments[0].scrollIntoView({block: 'nearest', inline: 'center'})", cells[0])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "mlflow_ui_runs.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="no Chromium/chromedriver found (apt-get install chromium chromium-driver, or set "
                           "FREEZEBENCH_CHROMIUM / FREEZEBENCH_CHROMEDRIVER)")
def test_grouping_by_policy_shows_one_group_per_policy(compare_runs, mlflow_server):
    """The README's path to comparing policies: Training runs page, Group by -> Tags -> policy. Each policy is
    one group holding its seeds (the UI aggregates the group's metrics); the screenshot is kept."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e .[test]")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    client = mlflow.tracking.MlflowClient(compare_runs["uri"])
    exp = client.get_experiment_by_name(compare_runs["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.suite = 't'")
    want: dict[str, int] = {}
    for r in runs:
        want[r.data.tags["policy"]] = want.get(r.data.tags["policy"], 0) + 1
    assert want == {"full": 2, "static": 2, "freezeout_linear": 2}
    query = urllib.parse.urlencode({"searchFilter": "tags.suite = 't'"}, quote_via=urllib.parse.quote)

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1000"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    wait = WebDriverWait(driver, 60)
    body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?{query}")
        wait.until(lambda d: "6 matching runs" in body())
        driver.find_element(By.XPATH, "//button[normalize-space(.)='Group by']").click()
        wait.until(lambda d: d.find_element(By.XPATH, "//*[@role='menuitemcheckbox'][normalize-space(.)='policy']")).click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait.until(lambda d: "Group by: policy" in body())

        def groups(d) -> dict[str, int] | bool:
            found = {}
            for el in d.find_elements(By.CSS_SELECTOR, ".ag-row[row-index]"):
                lines = [s.strip() for s in el.text.splitlines() if s.strip()]
                for i, s in enumerate(lines):
                    if s.startswith("Group: ") and i + 1 < len(lines) and lines[i + 1].isdigit():
                        found[s[len("Group: "):]] = int(lines[i + 1])
            return found if len(found) == len(want) else False

        shown = wait.until(groups)
        assert shown == want  # one group per policy, each with its two seeds
        assert "Additional runs" not in body()  # every run of the suite carries a policy tag
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "mlflow_ui_grouped_by_policy.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
