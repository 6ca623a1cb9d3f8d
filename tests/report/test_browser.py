"""report.html in a real browser: headless Chromium shows every image and logs no error.

Drives Debian's ``chromium`` with its ``chromedriver`` (packages ``chromium`` and
``chromium-driver``) through Selenium. The driver's path is given to Selenium, so Selenium
Manager never runs and nothing is downloaded. Without a browser the tests are skipped,
unless ``BNSTATS_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bnstats.report import write_demo_report

REQUIRE_BROWSER = os.environ.get("BNSTATS_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def unavailable(reason: str) -> None:
    """Skip, or fail when the browser is required."""
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason}, and BNSTATS_REQUIRE_BROWSER=1 requires the browser test")
    pytest.skip(reason)


def find_executable(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh empty profile, its console log recorded."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install selenium)")
    chromium = find_executable("chromium", "chromium-browser")
    driver_path = find_executable("chromedriver")
    if chromium is None or driver_path is None:
        unavailable("no chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def load_problems(driver, page: Path) -> tuple[int, list[str]]:
    """Open ``page``; return its number of images and everything wrong: an image not loaded
    (incomplete or of width 0), a console error, a resource fetched from outside the page."""
    driver.get(page.as_uri())
    images = driver.execute_script(
        "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt]);"
    )
    problems = [
        f"image {n} ({alt!r}) did not load: complete={complete}, naturalWidth={width}"
        for n, (complete, width, alt) in enumerate(images)
        if not (complete and width > 0)
    ]
    problems += [
        f"console {entry['level']}: {entry['message']}"
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
    ]
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )
    problems += [f"fetched {url}" for url in fetched if not url.startswith("data:")]
    return len(images), problems


def test_report_loads_every_image_without_console_errors(browser, quick_run, tmp_path):
    page = write_demo_report(quick_run, tmp_path)
    count, problems = load_problems(browser, page)
    assert count == 4
    assert problems == []
    title = browser.title
    assert title.startswith("bnstats demo")


def test_the_check_catches_a_broken_page(browser, tmp_path):
    """The same check on a page with a corrupt image and a link outside reports both."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:\">"
        f"<title>broken</title></head><body><img src='{PIXEL}' alt='fine'>"
        "<img src='data:image/png;base64,AAAA' alt='corrupt'>"
        "<img src='http://example.invalid/figure.png' alt='outside'></body></html>"
    )
    count, problems = load_problems(browser, page)
    assert count == 3
    assert any(p.startswith("image 1 ('corrupt') did not load") for p in problems), problems
    assert any(p.startswith("image 2 ('outside') did not load") for p in problems), problems
    assert any(p.startswith("console SEVERE") and "example.invalid" in p for p in problems)
    assert "fetched http://example.invalid/figure.png" in problems
    assert not any("image 0" in p for p in problems)


@pytest.mark.parametrize(("required", "outcome"), [(False, "skip"), (True, "fail")])
def test_a_missing_browser_skips_unless_required(monkeypatch, required, outcome):
    monkeypatch.setattr(f"{__name__}.REQUIRE_BROWSER", required)
    expected = pytest.skip.Exception if outcome == "skip" else pytest.fail.Exception
    with pytest.raises(expected, match="no chromium"):
        unavailable("no chromium")


def _ema_finals(history, layer: str, units, momentum: float, debias: bool) -> dict:
    """The Python estimator's final values for ``units``, fed the batches the layer took."""
    from bnstats import EMA

    ema = EMA(momentum, debias=debias)
    for moments in history.moments_seen(layer):
        ema.update(*moments)
    return {(stat, u): float(getattr(ema, stat)[u]) for stat in ("mean", "var") for u in units}


def _shown_numbers(driver) -> dict:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#momentum-numbers tr[data-stat]'), r => "
        "[r.dataset.stat, Number(r.dataset.unit), Array.from(r.querySelectorAll('[data-value]'),"
        " s => Number(s.dataset.value))]);"
    )
    return {(stat, unit): values for stat, unit, values in rows}


def test_momentum_slider_redraws_with_the_estimators_numbers(browser, quick_run, tmp_path):
    """Moving the slider (bnstats.report.momentum_script's JavaScript, in headless Chromium)
    changes the drawn curves and the numbers; at the slider's momentum
    they are the Python estimators' own (1e-9), and nothing is fetched."""
    page = write_demo_report(quick_run, tmp_path)
    _, problems = load_problems(browser, page)
    assert problems == []
    curve = "return document.querySelector('#momentum-panels polyline.ema').getAttribute('points');"
    before, numbers_before = browser.execute_script(curve), _shown_numbers(browser)
    momentum = float(browser.find_element("id", "momentum-value").get_attribute("data-momentum"))
    assert momentum == quick_run.config.momentum
    for position in ("150", "520"):
        browser.execute_script(
            "const s = document.getElementById('momentum-slider'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('input'));",
            position,
        )
        after, numbers = browser.execute_script(curve), _shown_numbers(browser)
        assert after != before and numbers != numbers_before
        momentum = float(
            browser.find_element("id", "momentum-value").get_attribute("data-momentum")
        )
        assert momentum == pytest.approx(10 ** (-3 + 3 * int(position) / 600), rel=1e-12)
        units = (0, 1, 2)
        plain = _ema_finals(quick_run.history, "bn1", units, momentum, debias=False)
        debiased = _ema_finals(quick_run.history, "bn1", units, momentum, debias=True)
        for key, (ema, _, ema_debiased, _, population) in numbers.items():
            assert ema == pytest.approx(plain[key], rel=1e-9, abs=1e-12)
            assert ema_debiased == pytest.approx(debiased[key], rel=1e-9, abs=1e-12)
            stat, unit = key
            target = getattr(quick_run.net.batchnorm_layers[0].estimators["population"], stat)
            assert population == pytest.approx(float(target[unit]), rel=1e-12)
        window = browser.execute_script(
            "return Array.from(document.querySelectorAll('#momentum-window [data-value]'),"
            " s => Number(s.dataset.value));"
        )
        steps = quick_run.history.steps
        assert window == pytest.approx([1 / momentum, (1 - momentum) ** steps], rel=1e-9)
        before, numbers_before = after, numbers
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )
    assert [url for url in fetched if not url.startswith("data:")] == []
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


_LAYOUT = """
const box = e => e.getBoundingClientRect();
const scaleOf = t => t.ownerSVGElement.getScreenCTM().a;
const texts = Array.from(document.querySelectorAll('.momentum svg text'));
const chart = document.querySelector('#momentum-accuracy svg');
const title = chart.querySelector('text');  // the first text is the chart's title
const ticks = Array.from(chart.querySelectorAll('text')).slice(1);
const drawn = Array.from(chart.querySelectorAll('polyline, circle, line'));
return {
  page: document.documentElement.scrollWidth, window: window.innerWidth,
  fonts: texts.map(t => parseFloat(getComputedStyle(t).fontSize) * scaleOf(t)),
  titleBottom: box(title).bottom,
  below: [...ticks, ...drawn].map(e => box(e).top),
  overlaps: ticks.filter(t => {
    const a = box(title), b = box(t);
    return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  }).map(t => t.textContent),
  // the y ticks: left of the plot, above the row of x ticks (the lowest texts)
  yTicks: ticks.filter(t => box(t).right < box(chart).left + 0.2 * box(chart).width
    && box(t).top < Math.max(...ticks.map(u => box(u).top)) - 2).map(t => t.textContent),
  panelTitles: Array.from(document.querySelectorAll('#momentum-panels svg'), svg => {
    const [first, ...rest] = Array.from(svg.querySelectorAll('text'), t => box(t));
    const a = first;
    return rest
      .some(b => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom);
  }),
};
"""


def _with_accuracies(page: Path, low: float, high: float) -> Path:
    """``page`` with its accuracy-against-momentum data replaced by values from ``low`` to
    ``high`` (the data block is JSON, not script: the page's policy still allows it)."""
    import json
    import re

    text = page.read_text()
    pattern = r'(<script type="application/json" id="momentum-data">)(.*?)(</script>)'
    block = re.search(pattern, text, re.S)
    data = json.loads(block.group(2))
    count = len(data["grid"])
    for k, name in enumerate(data["accuracy"]):
        data["accuracy"][name] = [
            low + (high - low) * ((i + k) % count) / (count - 1) for i in range(count)
        ]
    changed = text[: block.start(2)] + json.dumps(data) + text[block.end(2) :]
    out = page.with_name("accuracies.html")
    out.write_text(changed)
    return out


@pytest.mark.parametrize("width", [400, 1280])
def test_the_momentum_charts_are_readable_at_any_width(browser, quick_run, tmp_path, width):
    """At 400 px and 1280 px wide: no sideways scroll of the page (a wide table scrolls in
    its own box), chart text at 11 px or more, the accuracy axis title above the plot and
    its ticks, each small panel's title clear of its tick labels, and an accuracy axis
    fitted to accuracies between 0.85 and 0.98 (not 0 to 1)."""
    page = _with_accuracies(write_demo_report(quick_run, tmp_path), 0.85, 0.98)
    browser.set_window_size(width, 900)
    try:
        _, problems = load_problems(browser, page)
        assert problems == []
        layout = browser.execute_script(_LAYOUT)
    finally:
        browser.set_window_size(1280, 900)
    assert layout["page"] <= layout["window"], layout
    assert min(layout["fonts"]) >= 11, sorted(layout["fonts"])[:3]
    assert layout["overlaps"] == [] and not any(layout["panelTitles"])
    assert all(top >= layout["titleBottom"] for top in layout["below"])
    ticks = [float(t) for t in layout["yTicks"]]
    assert min(ticks) <= 0.85 and max(ticks) >= 0.98, ticks
    assert max(ticks) - min(ticks) <= 0.3 and len(ticks) >= 3, ticks
