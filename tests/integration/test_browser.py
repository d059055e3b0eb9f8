"""The UIs in a real browser: a custom run from the Prefect form, two runs compared in MLflow.

Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) drives the Prefect UI of
the stack: the deployment's page, Run -> Custom run, a changed ``config.name`` in the
parameter form, Submit; a worker of this test runs it to Completed. MLflow's compare
view then shows that run beside the session's pipeline run (``stack_run``). The new run
reuses every stage output of ``stack_run`` (the name is in no stage's cache key), so it
takes seconds. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from flows.deployments import deploy
from tests.integration.deploy_helpers import Worker, wait_for_final, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts"
WAIT_S = 120  # a page of the UI on a loaded 2-core machine
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--window-size=1400,1000",
)  # fmt: skip


def find_chromium() -> tuple[str, str]:
    """(browser, driver); installs the Debian packages when missing and possible."""

    def lookup() -> tuple[str | None, str | None]:
        browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
        return browser, shutil.which("chromedriver")

    browser, driver = lookup()
    if not (browser and driver):
        script = REPO / "scripts" / "install-system-deps.sh"
        subprocess.run(
            ["bash", str(script), "chromium", "chromium-driver"], check=False, timeout=900
        )
        browser, driver = lookup()
    if not (browser and driver):
        pytest.skip("chromium and chromedriver are missing and could not be installed "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = find_chromium()
    options = Options()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as err:
        pytest.skip(f"chromium did not start: {err.msg}")
    driver.set_page_load_timeout(WAIT_S)
    SCREENSHOTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait(driver):
    """Waits out re-renders of the single-page apps (elements replaced while waiting)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.5, ignored_exceptions=ignored)


def click_text(driver, tag: str, text: str) -> None:
    """Click the ``tag`` element whose own text is ``text`` once it is clickable."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    xpath = f"//{tag}[normalize-space(.)='{text}']"
    wait(driver).until(ec.element_to_be_clickable((By.XPATH, xpath))).click()


def field(driver, label: str):
    """The first text control after the first label with this text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    xpath = (
        f"(//label[normalize-space(.)='{label}']/following::*[self::textarea or self::input])[1]"
    )
    return wait(driver).until(ec.visibility_of_element_located((By.XPATH, xpath)))


def log_in(driver, stack) -> None:
    """What the Prefect UI's login page stores once its auth string was typed."""
    driver.get(stack.prefect_ui_url)
    driver.execute_script(
        "localStorage.setItem('prefect-password', btoa(arguments[0]))",
        stack.credentials.prefect_auth_string,
    )


def test_custom_run_from_the_prefect_form_and_mlflow_compare(
    local_stack, stack_run, browser, tmp_path
):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    config = tmp_path / "ui.yaml"
    config.write_text(yaml.safe_dump(stack_run.cfg.model_dump(mode="json"), sort_keys=False))
    pool = f"xlearner-ui-{uuid.uuid4().hex[:6]}"
    deploy(config, pool=pool, name="tiny-ui", sensor_every_s=None)

    log_in(browser, local_stack)
    browser.get(f"{local_stack.prefect_ui_url}/deployments")
    click_text(browser, "a", "tiny-ui")
    wait(browser).until(ec.url_contains("/deployments/deployment/"))
    click_text(browser, "button", "Run")
    click_text(browser, "button", "Custom run")
    label = "Name (Optional)"  # config.name, the first field of the form
    wait(browser).until(lambda b: field(b, label).get_attribute("value") == stack_run.cfg.name)
    name = field(browser, label)
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys("tiny_ui_custom")
    assert name.get_attribute("value") == "tiny_ui_custom"
    shot(browser, "prefect-custom-run-form")
    click_text(browser, "button", "Submit")  # back to the deployment, the new run on top
    run_link = (By.CSS_SELECTOR, "a[href*='/runs/flow-run/']")
    href = wait(browser).until(ec.presence_of_element_located(run_link)).get_attribute("href")
    flow_run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", href).group(1)

    with Worker(pool, worker_env(local_stack), tmp_path / "worker.log") as worker:
        run = wait_for_final(flow_run_id, worker=worker)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.log_tail()}"
    assert run.parameters["config"]["name"] == "tiny_ui_custom"
    browser.get(href)
    wait(browser).until(
        ec.presence_of_element_located((By.XPATH, "//*[normalize-space(.)='Completed']"))
    )
    shot(browser, "prefect-flow-run-completed")

    mlflow = MlflowClient(local_stack.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(stack_run.cfg.tracking.experiment)
    runs = {}
    for prefect_id in (stack_run.flow_run_id, flow_run_id):
        (found,) = mlflow.search_runs(
            [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{prefect_id}'"
        )
        runs[found.info.run_name] = found.info.run_id
    assert set(runs) == {stack_run.cfg.name, "tiny_ui_custom"}

    ids, experiments = (
        quote(json.dumps(list(runs.values()))),
        quote(json.dumps([experiment.experiment_id])),
    )
    credentials = local_stack.credentials  # MLflow's basic auth, on every request from here
    basic = f"{credentials.mlflow_username}:{credentials.mlflow_password}"
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders",
        {"headers": {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()}},
    )
    browser.get(f"{local_stack.mlflow_ui_url}/#/compare-runs?runs={ids}&experiments={experiments}")
    wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Comparing 2 Runs"))
    names = wait(browser).until(
        ec.presence_of_element_located((By.XPATH, "//*[normalize-space(.)='tiny_ui_custom']"))
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", names)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert stack_run.cfg.name in body and "transfer/avg_cls" in body
    shot(browser, "mlflow-compare-runs")
