"""How docs/images/mlflow-runs*.png were made: the MLflow UI on a DAG's store, in a real browser.

    # after `make run` (or any DAG) has written results/mlflow.db
    apt-get install chromium && python -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python docs/images/mlflow_screenshot.py results/mlflow.db tiny

It starts `mlflow server` on the store, opens the experiment's runs table (MLflow 3 opens on its GenAI
page otherwise), types the documented filter `tags.role = 'student'`, groups by `tags.method`, and saves
the table and the chart view as PNGs beside this file. Needs Debian's chromium (/usr/bin/chromium) and
playwright's Python package (no browser download); the mlflow executable is the project's .venv's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
MLFLOW = HERE.parents[1] / ".venv/bin/mlflow"
FILTER = "tags.role = 'student'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def experiment_id(base: str, name: str) -> str:
    req = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
    return json.load(urllib.request.urlopen(req, timeout=30))["experiment"]["experiment_id"]


def main(store: str, experiment: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{Path(store).resolve()}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        exp = experiment_id(base, experiment)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning")
            page.get_by_test_id("search-box").wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            close = page.locator("[aria-label='Close']")  # MLflow 3's assistant panel
            if close.count():
                close.last.click()
            page.get_by_test_id("search-box").click()
            page.keyboard.type(FILTER)
            page.keyboard.press("Enter")
            page.wait_for_timeout(3000)
            page.get_by_role("button", name="Group by").click()
            page.get_by_text("method", exact=True).first.click()
            page.keyboard.press("Escape")
            page.wait_for_timeout(3000)
            page.screenshot(path=str(HERE / "mlflow-runs.png"))
            page.locator("[value=CHART]").first.dispatch_event("click")  # the view switch: TABLE, CHART, ARTIFACT
            page.wait_for_timeout(6000)
            page.screenshot(path=str(HERE / "mlflow-runs-chart.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:3])
