"""Screenshots of a running federation's page in side-by-side mode, at 1280 and 390 px: the README's picture.

    python -m devtools.page_screenshot --url http://127.0.0.1:PORT/ --prompt "a large {ember} on a purple background" \
        --tick lagoon --out docs/page-side-by-side.png [--api-key-file F]

Drives Debian's chromium through Playwright (no browser download), as tests/test_page.py does: types the
prompt, ticks the named concepts, clicks "Side by side", waits for every picture, and saves the full page
at both widths (the narrow one beside --out, named with -390).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
WIDE, NARROW = 1280, 390


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="the page, e.g. http://127.0.0.1:8000/")
    ap.add_argument("--prompt", required=True, help="typed into the prompt box; {name} adds that concept")
    ap.add_argument("--tick", nargs="*", default=[], help="more concepts ticked in the picker")
    ap.add_argument("--api-key-file", type=Path, help="where the app requires an API key")
    ap.add_argument("--timeout-s", type=float, default=600, help="how long the pictures may take")
    ap.add_argument("--out", type=Path, required=True, help="PNG of the wide page")
    args = ap.parse_args()

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": WIDE, "height": 900})
        page.goto(args.url)
        if args.api_key_file:
            page.get_by_label("API key").fill(args.api_key_file.read_text().strip())
        expect(page.locator("#cards li").first).to_be_visible(timeout=60_000)
        page.get_by_label("Prompt", exact=True).fill(args.prompt)
        for name in args.tick:
            page.locator(f'#picker input[type=checkbox][data-name="{name}"]').check()
        page.get_by_role("button", name="Side by side").click()
        done = re.compile(r"picture\(s\) in")  # what the page says once every picture is in
        expect(page.locator("#generate-status")).to_have_text(done, timeout=args.timeout_s * 1000)
        for width, path in ((NARROW, args.out.with_name(f"{args.out.stem}-390.png")), (WIDE, args.out)):
            page.set_viewport_size({"width": width, "height": 900})
            page.screenshot(path=str(path), full_page=True)
            print(f"wrote {path}")
        browser.close()


if __name__ == "__main__":
    main()
