"""What users look at, in a real browser: headless Chromium renders the built documentation's
getting-started page and the predict page (the heatmaps); every image must load (a natural
width above 0) and every internal link must lead to a page, and to its anchor when it names one.

The site is built strictly (``tests.test_docs.build_site``) and served on 127.0.0.1. A harness
page of the same origin loads the page under test in an iframe, waits for its images and writes
what it found into its own DOM, which ``chromium --headless --dump-dom`` prints. A failing page
is screenshotted into the test's temporary folder (kept for failed tests) and the assertion
names the file. Without a ``chromium`` binary (``apt-get install chromium``; ``.ci/run`` installs
it where apt works) the tests are skipped with that reason.
"""

from __future__ import annotations

import html
import http.server
import json
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest

from tests.test_docs import build_site

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)"
)

#: loads ?page=... in an iframe, waits (10 s at most) for its images, reports images and links
HARNESS = """<!doctype html><html><body><pre id="result">pending</pre><script>
const frame = document.createElement("iframe");
frame.style.width = "1280px"; frame.style.height = "2400px";
frame.src = new URLSearchParams(location.search).get("page");
frame.onload = () => {
  const doc = frame.contentDocument, images = Array.from(doc.images), t0 = Date.now();
  const report = () => {
    if (images.some(i => !i.complete) && Date.now() - t0 < 10000) { setTimeout(report, 50); return; }
    document.getElementById("result").textContent = JSON.stringify({
      title: doc.title,
      images: images.map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth})),
      links: Array.from(doc.querySelectorAll("a[href]")).map(a => a.href),
    });
  };
  report();
};
document.body.appendChild(frame);
</script></body></html>
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # no request log on stderr
        pass


@pytest.fixture(scope="module")
def site_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The strictly built site, served on 127.0.0.1 for the module."""
    site = tmp_path_factory.mktemp("site") / "site"
    res = build_site(site)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (site / "__check.html").write_text(HARNESS)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, ""


def _problems(base: str, found: dict) -> list[str]:
    """Images that did not load and internal links that lead nowhere."""
    bad = [f"image did not load: {i['src']}" for i in found["images"] if i["width"] <= 0]
    pages: dict[str, tuple[int, str]] = {}
    for link in sorted(set(found["links"])):
        if not link.startswith(base):
            continue  # another site: not ours to check
        page, anchor = urldefrag(link)
        if page not in pages:
            pages[page] = _fetch(page)
        status, body = pages[page]
        if status != 200:
            bad.append(f"link {link}: HTTP {status}")
        elif anchor and f'id="{anchor}"' not in body:
            bad.append(f"link {link}: no element with id {anchor!r}")
    return bad


@pytest.mark.parametrize(
    ("page", "image"),
    [
        ("getting-started/", "qc-cmu-1-small-region.png"),
        ("predict/", "predict-heatmap-classes.png"),
    ],
)
def test_page_renders_with_its_images_and_links(
    site_url: str, page: str, image: str, tmp_path: Path
) -> None:
    status, _ = _fetch(f"{site_url}/{page}")
    assert status == 200, f"{page}: HTTP {status}"
    res = _chromium("--virtual-time-budget=20000", "--dump-dom",
                    f"{site_url}/__check.html?page=/{page}", profile=tmp_path / "profile")  # fmt: skip
    match = re.search(r'<pre id="result">(.*?)</pre>', res.stdout, flags=re.S)
    assert match and match.group(1) != "pending", (
        f"the harness reported nothing: {res.stderr[-2000:]}"
    )
    found = json.loads(html.unescape(match.group(1)))
    problems = _problems(site_url, found)
    if not any(urlsplit(i["src"]).path.endswith(image) for i in found["images"]):
        problems.append(f"no {image} on the page")
    if not found["links"]:
        problems.append("no links on the page")
    if problems:
        shot = tmp_path / f"{page.strip('/')}.png"
        _chromium("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}",
                  f"{site_url}/{page}", profile=tmp_path / "profile")  # fmt: skip
        pytest.fail(f"{page} ({found['title']}): {problems}; screenshot: {shot}")
