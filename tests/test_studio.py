"""``trinity studio`` served for real (a ``trinity studio`` process on a loopback port) over a
checkpoint root of finished runs, asked over HTTP and looked at in headless Chromium.

Checked here: runs are listed (and only runs); curves, rollouts, early-versus-late diffs and
configs come back; a config is validated with exactly ``trinity config check``'s one-line errors;
bad input (not a run, a path out of the root, a half-written metrics line, a corrupt rollouts file,
a config that does not parse, a bad parameter) is a clear message and the server keeps serving; the
page draws a run's curve, finds a rollout, shows a broken config's error and follows a live run.
``TRINITY_STUDIO_SCREENSHOTS=docs/studio`` also saves the screenshots of docs/studio.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from studio_runs import write_run

from trinity.cli.main import main
from trinity.config import ConfigError, load_config
from trinity.monitor import JsonlMonitor

HERE = Path(__file__).parent
BROKEN = [  # one of each kind: YAML, shape, schema, type, interpolation, combination, value
    HERE / "configs" / "broken" / f"{name}.yaml"
    for name in (
        "not_yaml",
        "yaml_list",
        "typo_tinker_rank",
        "wrong_type_int",
        "unset_env_var",
        "serve_bad_port",
        "negative_max_rollouts",
    )
]
SEED0, SEED1 = "trinity-demo/grpo/seed0", "trinity-demo/grpo/seed1"
TORN, CORRUPT = "trinity-demo/grpo/torn", "trinity-demo/grpo/corrupt"
PASTED = "pasted config"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("TRINITY_STUDIO_SCREENSHOTS")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    write_run(root, "seed0", seed=0)
    write_run(root, "seed1", seed=1, steps=8)
    torn = write_run(root, "torn", steps=4)
    with open(torn / "monitor" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "critic/rewards/me')  # the run was killed mid-line
    corrupt = write_run(root, "corrupt", steps=2)
    (corrupt / "monitor" / "rollouts.db").write_bytes(b"not sqlite at all " * 64)
    (corrupt / "config.yaml").unlink()
    (root / "trinity-demo" / "grpo" / "empty" / "log").mkdir(parents=True)  # not a run
    return root


@pytest.fixture(scope="module")
def url(root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRINITY_TEST_SURELY_UNSET"}
    command = [sys.executable, "-m", "trinity.cli.main", "studio", "--root", str(root)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--poll", "0.5"], cwd=HERE.parent, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "trinity studio exited"
            try:
                httpx.get(f"{base}/api/info", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "trinity studio did not start in 60 s"
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def get(url: str, path: str, status: int = 200, **params) -> dict | list:
    response = httpx.get(f"{url}{path}", params=params, timeout=30)
    assert response.status_code == status, response.text
    return response.json()


def validate(url: str, text: str) -> dict:
    response = httpx.post(f"{url}/api/validate", json={"text": text}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# ---- the API ----------------------------------------------------------------------------------
def test_lists_the_runs_under_the_root_and_nothing_else(url, root):
    info = get(url, "/api/info")
    assert info == {"root": str(root.resolve()), "exists": True, "poll_seconds": 0.5}
    runs = get(url, "/api/runs")
    assert {run["id"] for run in runs} == {SEED0, SEED1, TORN, CORRUPT}
    seed0 = next(run for run in runs if run["id"] == SEED0)
    assert seed0["has_rollouts"] and seed0["has_config"]


def test_curves_of_a_run(url):
    data = get(url, "/api/metrics", run=SEED0, key=["critic/rewards/mean", "actor/kl_loss"])
    assert {"critic/rewards/mean", "actor/grad_norm", "rollout/reward/mean"} <= set(data["keys"])
    assert data["series"]["critic/rewards/mean"]["steps"] == list(range(1, 13))
    assert data["series"]["actor/kl_loss"]["values"][-1] == pytest.approx(0.012)
    assert data["skipped"] == [] and data["last_step"] == 12


def test_a_half_written_metrics_line_is_named_and_the_rest_served(url):
    data = get(url, "/api/metrics", run=TORN, key="critic/rewards/mean")
    assert data["skipped"] == [9]  # 4 steps x 2 records, then the torn line
    assert data["series"]["critic/rewards/mean"]["steps"] == [1, 2, 3, 4]


def test_not_a_run_is_a_clear_message_and_the_server_keeps_serving(url, root):
    where = root.resolve()
    for run, message in [
        ("trinity-demo/grpo/empty", "it has no monitor/metrics.jsonl and no monitor/rollouts.db"),
        ("trinity-demo/nope", f"'trinity-demo/nope' is not a run under {where}: no such directory"),
        ("../..", f"'../..' is not a run under {where}"),
        (str(HERE.parent), "is not a run under"),
    ]:
        assert message in get(url, "/api/metrics", 404, run=run)["error"]
    assert get(url, "/api/rollouts", 422, run=SEED0, step="x")["error"].startswith(
        "step: Input should be a valid integer"
    )
    assert "sort must be one of" in get(url, "/api/rollouts", 422, run=SEED0, sort="x")["error"]
    assert "not a rollouts database" in get(url, "/api/steps", 422, run=CORRUPT)["error"]
    assert "config.yaml is missing" in get(url, "/api/config", 404, run=CORRUPT)["error"]
    assert len(get(url, "/api/runs")) == 4  # still serving


def test_rollouts_by_step_reward_and_text(url):
    steps = get(url, "/api/steps", run=SEED0)
    assert [s["step"] for s in steps] == list(range(1, 13)) and steps[0]["count"] == 8
    found = get(url, "/api/rollouts", run=SEED0, step=12, limit=5)
    assert found["total"] == 8 and len(found["rollouts"]) == 5
    assert {r["step"] for r in found["rollouts"]} == {12}
    best = get(url, "/api/rollouts", run=SEED0, min_reward=1, sort="-step")["rollouts"]
    assert best[0]["step"] == 12 and all(r["reward"] == 1 for r in best)
    assert "=" in best[0]["response"] and best[0]["advantage"] == 0.5
    found = get(url, "/api/rollouts", run=SEED0, search="8 + 9")
    assert found["total"] > 0 and all("8 + 9" in r["prompt"] for r in found["rollouts"])


def test_the_same_task_early_and_late(url):
    tasks = get(url, "/api/tasks", run=SEED0)
    assert len(tasks) == 4 and all(t["steps"] == 6 for t in tasks)
    task = get(url, "/api/task", run=SEED0, prompt=tasks[0]["prompt"])
    early, late = task["early"], task["late"]
    assert early["step"] == tasks[0]["first_step"] and late["step"] == tasks[0]["last_step"]
    assert len(early["rollouts"]) == len(late["rollouts"]) == 4
    best_late = max(late["rollouts"], key=lambda r: r["reward"])["response"]
    assert "".join(text for op, text in task["diff"] if op != "-") == best_late


def test_the_resolved_config_of_a_run(url):
    text = get(url, "/api/config", run=SEED1)["yaml"]
    assert "name: seed1" in text and "max_rollouts: 20000" in text


def test_validation_says_what_config_check_says(url, capsys):
    for path in BROKEN:
        try:
            load_config(path)
        except ConfigError as error:
            expected = str(error).replace(str(path), PASTED)
        answer = validate(url, path.read_text())
        assert answer["ok"] is False and answer["error"] == expected, path.name
    path = HERE / "configs" / "broken" / "typo_tinker_rank.yaml"
    assert main(["config", "check", str(path)]) == 2
    error = validate(url, path.read_text())["error"]
    assert capsys.readouterr().err == f"trinity: error: {error}\n"


def test_validation_of_a_good_config_and_of_text_that_does_not_parse(url):
    demo = (HERE.parent / "examples" / "grpo_demo.yaml").read_text()
    answer = validate(url, demo.replace("\nmodel:\n", "\nmodel:\n  max_cpu_loras: 4\n"))
    assert answer["ok"] is True and "algorithm_type: grpo" in answer["yaml"]
    assert any("max_cpu_loras" in w for w in answer["warnings"])
    answer = validate(url, "model: [unclosed\n")
    assert answer["error"].startswith(f"cannot read config '{PASTED}': invalid YAML at line 2")
    response = httpx.post(f"{url}/api/validate", content=b"{not json", timeout=10)
    assert response.status_code == 422 and response.json()["error"]
    assert validate(url, "mode: both\n")["error"].startswith("model.model_path is required")


def test_everything_is_served_from_here(url):
    page = httpx.get(url, timeout=10).text
    script = httpx.get(f"{url}/static/studio.js", timeout=10).text
    assert "http://" not in page + script and "https://" not in page + script  # no CDN
    for asset in ("vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css", "studio.css"):
        assert httpx.get(f"{url}/static/{asset}", timeout=10).status_code == 200


# ---- in a browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (scripts/setup.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=BROWSER_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == []  # no script error in the page


def shot(page, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def test_browser_draws_a_runs_curve_and_finds_a_rollout(url, page):
    page.goto(f"{url}/?runs={SEED0},{SEED1}")
    chart = page.locator('.chart[data-metric="critic/rewards/mean"]')
    chart.locator("canvas").wait_for()
    assert chart.get_attribute("data-runs") == f"{SEED0},{SEED1}"
    assert chart.get_attribute("data-last-step") == "12"
    assert SEED0 in chart.locator(".u-legend").inner_text()
    page.fill("#smoothing", "0.6")
    page.dispatch_event("#smoothing", "input")
    shot(page, "curves")

    page.click("#tabs >> text=Rollouts")
    page.select_option("#rollout-step", "12")
    page.locator("#rollout-count").get_by_text("rollouts 1-8 of 8").wait_for()
    first = page.locator("#rollout-table tbody tr.row").first
    assert first.locator("td").first.inner_text() == "12"
    first.click()
    assert "What is" in page.locator("#rollout-table tr.details").first.inner_text()
    page.click("#compare summary")
    page.select_option("#task", index=1)
    page.locator("#task-diff").wait_for()
    titles = page.locator("#task-view h3").all_inner_texts()
    assert titles == ["Early: step 1", "Late: step 11", "Best answer, step 1 → step 11"]
    assert page.locator("#task-diff ins").count() > 0  # step 1 guessed, step 11 knows
    shot(page, "rollouts")


def test_browser_shows_a_broken_configs_one_line_error(url, page):
    page.goto(f"{url}/?tab=validate&runs={SEED0}")
    page.fill("#config-text", "mode: both\nmodel:\n  model_path: demo\n  tinker:\n    rnak: 4\n")
    page.click("#validate-button")
    error = page.locator("#validate-error")
    assert error.inner_text() == "unknown key 'model.tinker.rnak' (did you mean 'rank'?)"
    shot(page, "validate")
    page.click("#load-run-config")
    page.click("#validate-button")
    page.locator("#validate-ok").wait_for()


def test_browser_says_what_is_wrong_and_goes_on(url, page):
    page.goto(f"{url}/?runs=trinity-demo/nope,{TORN}")
    messages = page.locator("#messages")
    messages.locator("li.error").get_by_text("'trinity-demo/nope' is not a run under").wait_for()
    warning = messages.locator("li.warning").get_by_text("metrics.jsonl line 9 is not a complete")
    warning.wait_for()
    chart = page.locator('.chart[data-metric="critic/rewards/mean"]')
    assert chart.get_attribute("data-last-step") == "4"  # the torn run's curve is still drawn
    page.click("#tabs >> text=Config")
    page.select_option("#config-run", CORRUPT)
    messages.get_by_text("config.yaml is missing").wait_for()
    page.select_option("#config-run", SEED0)
    page.locator("#config-yaml").get_by_text("name: seed0").wait_for()  # and it goes on


def test_browser_follows_a_live_run(url, page, root):
    run = "trinity-demo/grpo/growing"
    page.goto(f"{url}/?runs={run}")  # before the run has started
    page.locator("#messages li.error").get_by_text(f"'{run}' is not a run").wait_for()
    job = write_run(root, "growing", steps=3)
    chart = page.locator('.chart[data-metric="critic/rewards/mean"]')
    chart.locator("canvas").wait_for()  # the run is found and drawn, the message goes
    # a poll may land while write_run is mid-file: the next poll draws all three steps
    page.wait_for_function(
        "document.querySelector('.chart[data-metric=\"critic/rewards/mean\"]')"
        ".dataset.lastStep === '3'"
    )
    assert page.locator("#messages li.error").count() == 0
    assert "live" in page.locator(f'#runs li:has(input[data-run="{run}"])').inner_text()
    monitor = JsonlMonitor(job / "monitor" / "metrics.jsonl")
    monitor.log({"critic/rewards/mean": 1.0}, 4)  # the run logs its next step
    monitor.close()
    page.wait_for_function(
        "document.querySelector('.chart[data-metric=\"critic/rewards/mean\"]')"
        ".dataset.lastStep === '4'"
    )
