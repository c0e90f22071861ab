"""Browser tests: the report page in headless Chromium (Playwright)."""
