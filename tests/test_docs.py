"""The README and docs/: every link resolves, every page is reachable, every flag is documented."""
import re
from pathlib import Path

from helpers import ROOT
from mpitrain.config import FIELDS

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"^(    |\t).*$", "", page.read_text(), flags=re.M)  # headings, not indented code
    return {slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def links(page: Path) -> list:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme_and_the_readme_is_short():
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md"):
                todo.append((page.parent / path).resolve())
    assert set(PAGES) <= seen, sorted(str(p) for p in set(PAGES) - seen)
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_flag_is_explained_in_the_usage_page():
    usage = (ROOT / "docs" / "usage.md").read_text()
    missing = [name for name in FIELDS if f"`--{name.replace('_', '-')}`" not in usage]
    assert not missing, missing
    assert "--help-all" in usage


def test_the_version_is_the_changelogs_newest_release():
    import mpitrain
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d\d-\d\d$", changelog, flags=re.M)
    assert released and released[0] == mpitrain.__version__
