"""Drives the /connect page in headless Chromium (selenium + chromedriver) at phone width.

Usage: connect_browser.py ADMIN_URL PROVIDER ACCOUNT SCREENSHOT_DIR
Prints `key value` lines that tests/onboarding.rs checks.
"""
import shutil
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

admin, provider, account, shots = sys.argv[1:5]
options = Options()
options.binary_location = "/usr/bin/chromium"
profile = tempfile.mkdtemp(prefix="tokenproxy-chromium-")
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-proxy-server", "--window-size=390,844", f"--user-data-dir={profile}"]:
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, 20)
try:
    driver.get(admin + "/connect")
    card = f"#provider-{provider}"
    driver.find_element(By.CSS_SELECTOR, f"{card} input[name=account]").send_keys(account)
    driver.find_element(By.CSS_SELECTOR, f"{card} form.add button").click()
    # The mock provider's consent page: a person clicks Allow.
    wait.until(lambda d: d.find_elements(By.ID, "allow"))[0].click()
    result = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-result]"))[0]
    print("result", result.get_attribute("data-result"))
    print("sentence", result.find_element(By.TAG_NAME, "p").text.replace("\n", " "))
    driver.save_screenshot(f"{shots}/connect-result.png")
    driver.find_element(By.LINK_TEXT, "Back to connections").click()
    row = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'{card} [data-account="{account}"]'))[0]
    print("state", row.find_element(By.CSS_SELECTOR, "[data-role=state]").text)
    print("button", row.find_element(By.CSS_SELECTOR, "[data-role=connect]").text)
    countdown = row.find_element(By.CSS_SELECTOR, "[data-expires]")
    first = countdown.text
    time.sleep(2.2)
    print("countdown", first, "|", countdown.text)
    print("overflows", driver.execute_script(
        "return document.documentElement.scrollWidth > window.innerWidth"))
    driver.save_screenshot(f"{shots}/connect-page.png")
except Exception:
    print("url", driver.current_url, file=sys.stderr)
    print(driver.page_source[:3000], file=sys.stderr)
    raise
finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
