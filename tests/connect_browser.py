"""Drives the /connect page in headless Chromium (selenium + chromedriver) at phone width.

Usage: connect_browser.py ADMIN_URL PROVIDER ACCOUNT SCREENSHOT_DIR
Prints `key value` lines that tests/onboarding.rs checks.
"""
import sys
import time

from selenium.webdriver.common.by import By

from headless_chromium import session

admin, provider, account, shots = sys.argv[1:5]
with session(["--window-size=390,844"]) as (driver, wait):
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
