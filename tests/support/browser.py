"""A headless Chromium driven by Selenium, for the browser tests of the pages.

Selenium's calls block (each is an HTTP round trip to chromedriver, which waits for the
page), while the node under test answers in the trial reactor of this same process: a
Selenium call made on the reactor thread would wait for a page the reactor can never
serve. So every call runs in the browser's own thread (one thread: the calls keep their
order) and the test waits on its Deferred::

    browser = yield Browser.start()
    yield browser.run(lambda d: d.get(url))
    yield browser.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-input]"), "an input row")

Debian's ``chromium`` and ``chromium-driver`` (bin/setup installs both) and Selenium from
PyPI (the ``test`` extras) are needed: without them a test errors, it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, TypeVar

from twisted.internet import defer, reactor, threads
from twisted.python.threadpool import ThreadPool

from emond.app.programs import ROOT, MissingProgram

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1280, 800  # the viewport, and so every screenshot's size
SCREENSHOTS = os.path.join(ROOT, "docs", "screenshots")
WAIT = 20.0  # seconds a DOM condition may take (a loaded machine; the usual is well under 1 s)

T = TypeVar("T")


def require() -> None:
    missing = [(path, package) for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
               if not os.access(path, os.X_OK)]
    if missing:
        names = " ".join(package for _, package in missing)
        raise MissingProgram(
            f"{', '.join(path for path, _ in missing)} not found: the browser tests need Debian's "
            f"{names} (bin/setup installs them: apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError as e:
        raise MissingProgram(
            "the browser tests need Selenium from PyPI: .venv/bin/pip install -e '.[test]' (bin/setup does)"
        ) from e


def new_driver(tmp: str) -> Any:
    """A headless Chromium whose viewport is WIDTHxHEIGHT and whose console is readable
    (blocking: a thread's job). Chromium and chromedriver keep their temporary files in
    ``tmp`` (their TMPDIR; Chromium leaves a folder in it at each quit): the caller removes it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}",
                     "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                     "--disable-background-networking", "--disable-sync", "--password-store=basic",
                     "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Selenium Manager would look for a driver on the network: Debian's is given, offline
    os.environ["SE_OFFLINE"] = "true"
    service = Service(CHROMEDRIVER, log_output=os.devnull, env={**os.environ, "TMPDIR": tmp})
    driver = webdriver.Chrome(service=service, options=options)
    # the window is WIDTHxHEIGHT less the browser's frame: grow it until the page's viewport is
    viewport = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * WIDTH - viewport[0], 2 * HEIGHT - viewport[1])
    driver.set_page_load_timeout(WAIT)
    return driver


class Browser:
    """One headless Chromium and the one thread its Selenium calls run in."""

    def __init__(self, pool: ThreadPool, driver: Any, tmp: str) -> None:
        self.pool = pool
        self.driver = driver
        self.tmp = tmp

    @classmethod
    @defer.inlineCallbacks
    def start(cls):
        """A new browser (fires once Chromium is up); MissingProgram without one."""
        require()
        pool = ThreadPool(minthreads=1, maxthreads=1, name="selenium")
        pool.start()
        tmp = tempfile.mkdtemp(prefix="emond-chromium-")
        try:
            driver = yield threads.deferToThreadPool(reactor, pool, new_driver, tmp)
        except BaseException:
            pool.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(pool, driver, tmp)

    def run(self, action: Callable[[Any], T]) -> defer.Deferred[T]:
        """``action(driver)`` in the browser's thread; its result."""
        return threads.deferToThreadPool(reactor, self.pool, action, self.driver)

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> defer.Deferred[Any]:
        """Until ``condition(driver)`` is truthy (WebDriverWait, in the browser's thread): its value.
        AssertionError naming ``what``, the page's URL and its console after ``timeout`` seconds."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        # an element missing or replaced while the page redraws: not yet
        transient = (NoSuchElementException, StaleElementReferenceException)

        def waiting(driver: Any) -> Any:
            try:
                return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=transient).until(condition)
            except TimeoutException:
                console = [entry.get("message") for entry in driver.get_log("browser")]
                raise AssertionError(f"{what}: not within {timeout:g} s at {driver.current_url}; console: {console}") from None

        return self.run(waiting)

    def console_errors(self) -> defer.Deferred[list[str]]:
        """The SEVERE entries of the console since the last look (reading the log empties it)."""
        return self.run(lambda d: [e["message"] for e in d.get_log("browser") if e.get("level") == "SEVERE"])

    def screenshot(self, page: str) -> defer.Deferred[str]:
        """The viewport (WIDTHxHEIGHT) as ``docs/screenshots/<page>.png`` of this checkout; its path."""
        path = os.path.join(SCREENSHOTS, f"{page}.png")

        def take(driver: Any) -> str:
            os.makedirs(SCREENSHOTS, exist_ok=True)
            viewport = driver.execute_script("return [window.innerWidth, window.innerHeight]")
            if viewport != [WIDTH, HEIGHT]:
                raise AssertionError(f"the viewport is {viewport}, not {WIDTH}x{HEIGHT}")
            if not driver.save_screenshot(path):
                raise AssertionError(f"the screenshot of {page} was not written")
            return path

        return self.run(take)

    @defer.inlineCallbacks
    def quit(self):
        """Close Chromium and chromedriver, then the thread; remove their temporary files."""
        try:
            yield self.run(lambda d: d.quit())
        finally:
            self.pool.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
