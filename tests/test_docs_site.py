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


def rendered_dom(browser: str, page: Path, profile: Path, *options: str) -> str:
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
            *options,
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


# --- the API pages and the other pages read as a site --------------------------------------------

REST_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const|ref):`?")
PAGES = ("index", "math", "conventions", "precise_bn", "distributed", "variants", "results",
         "performance", "api")  # fmt: skip


def _page(site: Path, name: str) -> str:
    path = site / "index.html" if name == "index" else site / name / "index.html"
    return path.read_text(encoding="utf-8")


def test_docstrings_render_without_rest_markup(site: Path) -> None:
    html = _page(site, "api")
    text = visible_text(html)
    role = REST_ROLE.search(text)
    assert role is None, text[max(0, role.start() - 80) : role.end() + 80]
    marker = re.search(r"::[ \t]*$", text, re.MULTILINE)  # a literal-block marker left raw
    assert marker is None, text[max(0, marker.start() - 80) : marker.end() + 20]
    # The roles became links to the objects' entries, and the literal blocks code blocks.
    internal = r'<a class="autorefs autorefs-internal"[^>]*href="#(batchnorm\.[\w.]+)"'
    links = re.findall(internal, html)
    assert len(links) > 40 and "batchnorm.functional.forward_train" in links
    assert "batchnorm.precise.precise_bn" in links  # batchnorm.precise_bn, through its alias
    assert html.count("<pre>") > 30
    assert "<p>With m values per channel:</p>" in html
    for name in PAGES:
        assert REST_ROLE.search(visible_text(_page(site, name))) is None, name


def test_links_between_pages_say_page_titles(site: Path) -> None:
    for name in PAGES:
        for href, title in re.findall(r'<a href="([^"#:]*)"[^>]*>(.*?)</a>', _page(site, name)):
            text = visible_text(title).strip()
            assert not re.search(r"\w\.md\b", text), f"{name}: link {href!r} says {text!r}"


def test_the_home_page_has_the_install_step(site: Path) -> None:
    text = visible_text(_page(site, "index"))
    assert "Install" in text and "pip install -e ." in text and "python -m venv" in text


OVERFLOW_PROBE = """
<script>
window.addEventListener("load", () => {
  const wide = [...document.querySelectorAll("pre > code, pre")]
    .filter((el) => el.scrollWidth > el.clientWidth + 1)
    .map((el) => el.textContent.slice(0, 60));
  document.body.setAttribute("data-overflow", JSON.stringify(wide));
  document.body.setAttribute("data-width", String(window.innerWidth));
});
</script>
"""


def test_code_blocks_do_not_scroll_sideways_at_1280_px(
    site: Path, chromium: str, tmp_path: Path
) -> None:
    for name in PAGES:
        page = site / "index.html" if name == "index" else site / name / "index.html"
        probe = page.with_name("overflow-probe.html")  # beside the page: its assets resolve
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>",
                         OVERFLOW_PROBE + "</body>"), encoding="utf-8")  # fmt: skip
        dom = rendered_dom(chromium, probe, tmp_path / "profile", "--window-size=1280,900")
        width = re.search(r'data-width="(\d+)"', dom)
        overflow = re.search(r'data-overflow="([^"]*)"', dom)
        assert width is not None and overflow is not None, name
        assert int(width[1]) == 1280
        assert overflow[1] == "[]", f"{name}: {overflow[1]}"
