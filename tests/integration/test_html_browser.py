"""The run report as a person sees it: a real run folder (the harness CLI, one case with a seeded
fault), its index.html opened from disk in headless Chromium with JavaScript off, at 1280 px.

JavaScript is turned off through the profile's content setting (what a user's "Don't allow sites
to use JavaScript" does), not ``--blink-settings=scriptEnabled=false``: with that switch Chromium's
headless ``--dump-dom`` and ``--screenshot`` silently produce nothing. A control page proves the
setting took. The screenshot is kept in ``$HARNESS_ARTIFACTS`` (default: reports/test-artifacts/).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import workspace
from harness.execution.run_dir import LATEST, RunDir
from harness.reporting import run_document
from harness.reporting.html import rendering, run_page

# One worker for the module under xdist: its tests share one harness run (~30 s).
pytestmark = [pytest.mark.cpu, pytest.mark.xdist_group("html-browser")]

FAULTY, CLEAN = "llama/tp1/memory/roundtrip", "qwen2/tp1/memory/roundtrip"
WIDTH, HEIGHT = 1280, 900
SCREENSHOT_NAME = "html-report.png"


# ------------------------------------------------------------------------------- browser


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no Chromium: install Debian's chromium package")
    return binary


def chromium(binary: str, profile_root: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium call, offline, in a fresh profile with JavaScript blocked."""
    profile = profile_root / f"profile-{len(list(profile_root.glob('profile-*')))}"
    (profile / "Default").mkdir(parents=True)
    (profile / "Default" / "Preferences").write_text(
        json.dumps({"profile": {"default_content_setting_values": {"javascript": 2}}}))
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args],
        capture_output=True, text=True, timeout=120)


def dump_dom(binary: str, profile_root: Path, page: Path) -> "Node":
    r = chromium(binary, profile_root, "--dump-dom", page.as_uri())
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return parse_html(r.stdout)


# ------------------------------------------------------------------ the DOM Chromium rendered


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list["Node | str"] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, tag: str, cls: str | None = None) -> list["Node"]:
        return [n for n in self.walk() if n.tag == tag and (cls is None or cls in n.classes)]

    def by_id(self, id_: str) -> "Node":
        return next(n for n in self.walk() if n.attrs.get("id") == id_)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__()
        self.root = Node("#document", {})
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.open[-1].children.append(node)
        if tag not in VOID:
            self.open.append(node)

    def handle_endtag(self, tag):
        for depth in range(len(self.open) - 1, 0, -1):
            if self.open[depth].tag == tag:
                del self.open[depth:]
                return

    def handle_data(self, data):
        self.open[-1].children.append(data)


def parse_html(text: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(text)
    return builder.root


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> str:
    return chromium_binary()


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory) -> Path:
    """index.html of a real run: the CLI runs two cases, one with a fault that drops the final
    norm from the export. Golden expectations come from an empty folder, so only the run decides
    the colours."""
    tmp = tmp_path_factory.mktemp("html-report")
    env = dict(os.environ, HARNESS_REPORTS=str(tmp / "reports"))
    argv = ["run", FAULTY, CLEAN, "--inject", "export-drops-final-norm@llama/*"]
    cli = subprocess.run([sys.executable, "-m", "harness", *argv], capture_output=True, text=True, env=env,
                         cwd=workspace.REPO_ROOT, timeout=600)
    assert cli.returncode == 1, cli.stdout[-3000:] + cli.stderr[-3000:]  # 1: a case failed, as seeded
    run = RunDir((tmp / "reports" / LATEST).resolve())
    doc, results = run_document.load_run(run.path)
    assert {case_id: r.status for case_id, r in results.items()} == {FAULTY: "fail", CLEAN: "pass"}
    assert results[FAULTY].first_failing_check.name == "tensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_GOLDEN", str(tmp / "golden"))
        return run_page.write_run_page(run, list(results.values()), doc["meta"])


# ----------------------------------------------------------------------------------- tests


def test_the_browser_really_has_javascript_off(browser, tmp_path):
    page = tmp_path / "control.html"
    page.write_text("<html><body><p id='x'>static</p>"
                    "<script>document.getElementById('x').textContent = 'script ran'</script></body></html>")
    assert dump_dom(browser, tmp_path, page).by_id("x").text == "static"


def test_grid_shows_one_red_cell_and_the_drill_down_shows_the_failing_check(browser, report, tmp_path):
    dom = dump_dom(browser, tmp_path, report)
    cells = [td for table in dom.find_all("table", "grid") for td in table.find_all("td", "cell")]
    assert len(cells) == 2
    red = [td for td in cells if "attention" in td.classes]
    assert len(red) == 1 and red[0].text.strip() == "FAIL"
    anchor = red[0].find_all("a")[0].attrs["href"]
    assert anchor == f"#{rendering.case_anchor(FAULTY)}"

    case = dom.by_id(anchor[1:])
    assert case.tag == "details" and "open" in case.attrs  # shown without a click, without script
    failing = [row.find_all("td")[1].text for row in case.find_all("tr", "check-fail")]
    assert failing[0] == "tensors"
    assert "model.norm.weight" in case.text  # the tensor the fault dropped
    assert "==> rank0.log <==" in case.text  # the rank log tail

    clean = dom.by_id(rendering.case_anchor(CLEAN))
    assert "open" not in clean.attrs and not clean.find_all("tr", "check-fail")


def test_screenshot_at_1280_px_is_kept_as_an_artifact(browser, report, tmp_path):
    shot = tmp_path / SCREENSHOT_NAME
    r = chromium(browser, tmp_path, f"--screenshot={shot}", report.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert png_size(shot) == (WIDTH, HEIGHT)
    artifacts = Path(os.environ.get("HARNESS_ARTIFACTS") or workspace.REPO_ROOT / "reports" / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, artifacts / SCREENSHOT_NAME)
