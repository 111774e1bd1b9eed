"""Debian's Chromium and ChromeDriver, headless, for the browser tests (tests/*_browser.py).

`session(extra_flags)` is a context manager that yields (driver, wait): a fresh profile, no
proxy, none of Chromium's own network traffic (this machine's network is closed). On an error
it prints the page's address and source to stderr; it always quits and removes the profile.
"""
import contextlib
import shutil
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


@contextlib.contextmanager
def session(extra_flags=()):
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="tokenproxy-chromium-")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server", f"--user-data-dir={profile}", *extra_flags]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver, WebDriverWait(driver, 20)
    except Exception:
        print("url", driver.current_url, file=sys.stderr)
        print(driver.page_source[:3000], file=sys.stderr)
        raise
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
