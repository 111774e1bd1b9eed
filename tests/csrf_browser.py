"""Login CSRF in a real Chromium: a page on another origin (localhost, while the admin API is
127.0.0.1: another site) sends the browser to a flow's start, by navigation and by a form POST.

Usage: csrf_browser.py ADMIN_URL PROVIDER ACCOUNT
Prints `key value` lines that tests/onboarding.rs checks.
"""
import http.server
import sys
import threading

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

from headless_chromium import session

admin, provider, account = sys.argv[1:4]
start = f"{admin}/connect/{provider}?account={account}"
pages = {
    "/navigate.html": f'<!doctype html><script>location.href = "{start}";</script>',
    "/form.html": f'<!doctype html><form id="f" method="post" action="{admin}/connect/{provider}">'
                  f'<input name="account" value="{account}"></form><script>document.getElementById("f").submit();</script>',
}


class Evil(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = pages.get(self.path, "").encode()
        self.send_response(200 if body else 404)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def result_of_page(wait):
    # The element may belong to the page being left (a click starts a navigation): read again.
    def read(d):
        try:
            found = d.find_elements(By.CSS_SELECTOR, "[data-result]")
            return found[0].get_attribute("data-result") if found else None
        except StaleElementReferenceException:
            return None
    return wait.until(read)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
threading.Thread(target=server.serve_forever, daemon=True).start()
evil = f"http://localhost:{server.server_address[1]}"
try:
    with session() as (driver, wait):
        driver.get(evil + "/navigate.html")
        wait.until(lambda d: d.current_url.startswith(admin))
        print("navigation", result_of_page(wait))
        driver.get(evil + "/form.html")
        wait.until(lambda d: d.current_url.startswith(admin))
        print("form", result_of_page(wait))
        # The person opens the link again and decides: the page's Connect button is a
        # same-origin POST.
        driver.get(evil + "/navigate.html")
        wait.until(lambda d: d.current_url.startswith(admin))
        driver.find_element(By.CSS_SELECTOR, "[data-role=connect]").click()
        wait.until(lambda d: "/oauth/callback" in d.current_url)
        print("clicked", result_of_page(wait))
finally:
    server.shutdown()
