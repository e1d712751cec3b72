"""The docs site builds with ``mkdocs build --strict`` and its formulas render offline.

The math pages are written with pymdownx.arithmatex, which leaves ``\\( ... \\)`` and
``\\[ ... \\]`` in the HTML for a script to typeset. The site ships its own KaTeX
(docs/assets/katex), so this test builds the site, opens math.md's page in headless Chromium from
the file system with networking switched off, and reads the DOM after the scripts ran. Skipped
where mkdocs (with mkdocs-material and mkdocstrings) or Chromium is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class _Text(HTMLParser):
    """The visible text of a page: no scripts, styles, or KaTeX's MathML copy of the source."""

    HIDDEN = frozenset({"script", "style", "annotation"})

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.depth += tag in self.HIDDEN

    def handle_endtag(self, tag: str) -> None:
        self.depth -= tag in self.HIDDEN

    def handle_data(self, data: str) -> None:
        if not self.depth:
            self.parts.append(data)


def visible_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return "".join(parser.parts)


RAW_DELIMITER = re.compile(r"\\\(|\\\)|\\\[|\\\]")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr}"
    return out


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def rendered_dom(browser: str, page: Path, profile: Path) -> str:
    """The DOM of a local page after its scripts ran, with every network feature off."""
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_built_math_page_holds_math_for_the_browser(site: Path) -> None:
    html = (site / "math" / "index.html").read_text(encoding="utf-8")
    assert html.count('class="arithmatex"') > 20
    # Without a script, this is what a reader would see: raw delimiters.
    assert RAW_DELIMITER.search(visible_text(html))


def test_the_site_loads_nothing_from_the_network(site: Path) -> None:
    html = (site / "math" / "index.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
    sheets = re.findall(r"<link[^>]*\bhref=\"([^\"]+\.css)\"", html)
    assert any(src.endswith("katex.min.js") for src in scripts)
    assert any(href.endswith("katex.min.css") for href in sheets)
    for url in scripts + sheets:
        assert "://" not in url and not url.startswith("//"), url
    assert "fonts.googleapis.com" not in html
    fonts = site / "assets" / "katex" / "fonts"
    css = (site / "assets" / "katex" / "katex.min.css").read_text(encoding="utf-8")
    for name in re.findall(r"url\(fonts/([^)]+\.woff2)\)", css):
        assert (fonts / name).is_file(), name


def test_math_renders_offline_in_a_browser(site: Path, chromium: str, tmp_path: Path) -> None:
    page = site / "math" / "index.html"
    expected = page.read_text(encoding="utf-8").count('class="arithmatex"')
    dom = rendered_dom(chromium, page, tmp_path / "profile")
    # Every formula was typeset by KaTeX (one .katex element each), without a parse error.
    assert len(re.findall(r'<span class="katex">', dom)) == expected
    assert "katex-error" not in dom
    text = visible_text(dom)
    leftover = RAW_DELIMITER.search(text)
    assert leftover is None, text[max(0, leftover.start() - 80) : leftover.end() + 80]
