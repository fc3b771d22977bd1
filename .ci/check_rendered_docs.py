"""Run by `nox -s docs` after `mkdocs build --strict`: the built site shows every list as a
list, and no docstring turned into a blockquote.

    python .ci/check_rendered_docs.py [SITE_DIR]   # checks site/ unless told
    python .ci/check_rendered_docs.py --self-test  # builds a tiny broken site; must fail

Python-Markdown (mkdocs, mkdocstrings) only starts a list after a blank line: without one,
the items are glued to the sentence before them as one run-on paragraph, and `mkdocs build
--strict` does not warn. GitHub renders the same Markdown as a list, so it looks right in a
review. Likewise a docstring line that starts with `>` (a wrapped "`x`\\n> 0") becomes a
blockquote. This reads the built HTML, so it covers the guides, pages included with
snippets (README.md, CHANGELOG.md) and the API pages that mkdocstrings renders from
docstrings alike. It fails on:

- a `<p>` or `<li>` whose own text has a later line that starts with a list marker
  (`- `, `* `, `+ `, `1. `, `1) `): a list or nested list that did not render;
- a `<blockquote>` in an API page (under `api/`) or in any docstring mkdocstrings renders.

Each problem names the page, the text, and the source line it comes from (searched for in
docs/, README.md, CHANGELOG.md and src/). Needs only the standard library; the self-test
needs mkdocs and the docs plugins (the `docs` dependency group).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
import textwrap
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A line that starts a list item: "- x", "* x", "+ x", "1. x", "12) x".
LIST_MARKER = re.compile(r"^[ \t]*(?:[-*+]|\d{1,3}[.)])[ \t]+\S")
# Elements whose text is not prose we check, and those that end a text run.
SKIPPED = {"pre", "script", "style", "svg", "nav", "header", "footer", "textarea"}
BLOCKS = {
    "p", "li", "ul", "ol", "div", "td", "th", "table", "blockquote", "dd", "dt", "dl",
    "h1", "h2", "h3", "h4", "h5", "h6", "details", "summary", "article", "section", "form",
}  # fmt: skip
VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
    "track", "wbr",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Problem:
    page: str  # relative to the site folder, e.g. "serving.html"
    kind: str  # "run-on list" or "blockquote"
    text: str  # the rendered text, as the reader sees it
    source: str = ""  # "docs/serving.md:41", where found

    def __str__(self) -> str:
        where = f" (source: {self.source})" if self.source else " (source line not found)"
        if self.kind == "run-on list":
            what = "a list renders as run-on text: add a blank line before the list"
        else:
            what = "a docstring line starting with '>' renders as a blockquote: rewrap it"
        quoted = textwrap.indent(self.text.strip(), "    | ")
        return f"{self.page}{where}: {what}\n{quoted}"


class _PageParser(HTMLParser):
    """Collects the own text of every <p> and <li>, and every docstring <blockquote>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, inside a mkdocstrings object)
        self.runs: list[list[str]] = []  # the text of each open block element
        self.paragraphs: list[tuple[str, str]] = []  # (tag, own text) of every p and li
        self.blockquotes: list[tuple[bool, str]] = []  # (in a docstring, text)
        self.quote_text: list[list[str]] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        in_doc = (bool(self.stack) and self.stack[-1][1]) or "doc" in classes
        self.stack.append((tag, in_doc))
        if tag in SKIPPED:
            self.skip += 1
        if tag in BLOCKS:
            self.runs.append([])
        if tag == "blockquote":
            self.quote_text.append([])

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or tag not in (t for t, _ in self.stack):
            return  # a stray end tag: ignore it rather than unwind the stack
        while self.stack:
            open_tag, in_doc = self.stack.pop()
            if open_tag in SKIPPED:
                self.skip -= 1
            if open_tag in BLOCKS:
                text = "".join(self.runs.pop())
                if open_tag in ("p", "li"):
                    self.paragraphs.append((open_tag, text))
            if open_tag == "blockquote":
                self.blockquotes.append((in_doc, "".join(self.quote_text.pop())))
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.runs:
            self.runs[-1].append(data)
        for quote in self.quote_text:
            quote.append(data)


def _normalized(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


class _Sources:
    """Finds the source line a piece of rendered text comes from."""

    def __init__(self, roots: list[Path], base: Path) -> None:
        self.base = base
        self.lines: list[tuple[str, int, str]] = []
        for root in roots:
            files = [root] if root.is_file() else sorted(root.rglob("*"))
            for path in files:
                if path.suffix not in (".md", ".py") or not path.is_file():
                    continue
                name = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    self.lines.append((name, number, _normalized(line)))

    def find(self, rendered_line: str, page: str) -> str:
        # Markup is gone from the rendered text ("`k`" is "k"), so compare letters and
        # digits only, on the start of the line (links may follow).
        key = _normalized(re.sub(r"^[ \t]*(?:[-*+>]|\d{1,3}[.)])[ \t]+", "", rendered_line))[:40]
        if len(key) < 8:
            return ""
        hits = [f"{name}:{number}" for name, number, line in self.lines if key in line]
        stem = Path(page).with_suffix("").as_posix().removesuffix("/index")
        hits.sort(key=lambda hit: stem not in hit)  # the page's own Markdown first
        return ", ".join(hits[:3])


def check_site(site: Path, sources: _Sources | None = None) -> list[Problem]:
    """Every run-on list and docstring blockquote in the HTML pages under `site`."""
    problems = []
    pages = sorted(p for p in site.rglob("*.html") if p.relative_to(site).parts[0] != "assets")
    for path in pages:
        page = path.relative_to(site).as_posix()
        parser = _PageParser()
        parser.feed(path.read_text(errors="replace"))
        parser.close()
        for _, text in parser.paragraphs:
            lines = text.strip("\n").split("\n")
            marked = [line for line in lines[1:] if LIST_MARKER.match(line)]
            if marked:
                source = sources.find(marked[0], page) if sources else ""
                problems.append(Problem(page, "run-on list", "\n".join(lines[:6]), source))
        api_page = page.startswith("api/")
        for in_doc, text in parser.blockquotes:
            if in_doc or api_page:
                source = sources.find(text.strip().split("\n")[0], page) if sources else ""
                problems.append(Problem(page, "blockquote", "> " + text.strip(), source))
    if not pages:
        raise SystemExit(f"no HTML pages under {site}: build the site first (mkdocs build)")
    return problems


def default_sources(root: Path) -> _Sources:
    roots = [root / "docs", root / "README.md", root / "CHANGELOG.md", root / "src"]
    return _Sources([r for r in roots if r.exists()], root)


# The self-test: a tiny site with the project's own mkdocs.yml, one good page, one page
# with two broken lists, and an API page rendered from a docstring with a broken list, a
# line starting with "> 0" and a good list.
_GOOD_PAGE = """\
# Good

A sentence before a list, with the blank line:

- first item
- second item, wrapped
  onto a second line

1. one
2. two

> A deliberate blockquote in a guide is fine.
"""
_BROKEN_PAGE = """\
# Broken

Steps without a blank line:
- broken bullet one
- broken bullet two

A numbered list glued on:
1. broken step one
2. broken step two
"""
_MODULE = '''\
"""A module whose docstring is rendered by mkdocstrings."""


def scale(x: float) -> float:
    """Scales x.

    Limits without a blank line:
    - docstring bullet one
    - docstring bullet two

    Good limits:

    - fine bullet

    Args:
        x: the value.

    Returns:
        x, doubled.

    Raises:
        ValueError: a value that is not a finite number
            > 0 of anything.
    """
    return 2 * x
'''
# (page, kind, a word of the text, the source file) of every problem the self-test expects.
_EXPECTED = {
    ("broken.html", "run-on list", "broken bullet one", "docs/broken.md"),
    ("broken.html", "run-on list", "broken step one", "docs/broken.md"),
    ("api/scale.html", "run-on list", "docstring bullet one", "src/tiny_module.py"),
    ("api/scale.html", "blockquote", "of anything", "src/tiny_module.py"),
}


def self_test() -> int:
    """Builds a tiny site with the project's mkdocs.yml and checks that every broken list and
    the blockquote are reported with their source, and nothing else."""
    import yaml  # mkdocs' own dependency

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for key in ("nav", "extra_css", "docs_dir", "site_dir"):
        config.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="check-rendered-docs-") as work:
        base = Path(work)
        (base / "docs" / "api").mkdir(parents=True)
        (base / "src").mkdir()
        (base / "docs" / "index.md").write_text(_GOOD_PAGE)
        (base / "docs" / "broken.md").write_text(_BROKEN_PAGE)
        (base / "docs" / "api" / "scale.md").write_text("# scale\n\n::: tiny_module.scale\n")
        (base / "src" / "tiny_module.py").write_text(_MODULE)
        (base / "mkdocs.yml").write_text(yaml.safe_dump(config))
        build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"]
        subprocess.run([*build, "--site-dir", str(base / "site")], cwd=base, check=True)
        problems = check_site(base / "site", default_sources(base))
    print(f"self-test: the tiny broken site gives {len(problems)} problem(s):")
    for problem in problems:
        print(textwrap.indent(str(problem), "  "))
    found = {(p.page, p.kind) for p in problems}
    failures = []
    for page, kind, words, source in sorted(_EXPECTED):
        matches = [p for p in problems if (p.page, p.kind) == (page, kind) and words in p.text]
        if not matches:
            failures.append(f"not reported: {kind} in {page} ({words!r})")
        elif not matches[0].source.startswith(source):
            failures.append(f"{kind} in {page}: source {matches[0].source!r}, not {source}")
    if len(problems) != len(_EXPECTED) or found != {(p, k) for p, k, _, _ in _EXPECTED}:
        failures.append(f"expected exactly {len(_EXPECTED)} problems on the broken pages only")
    for failure in failures:
        print(f"self-test FAILED: {failure}")
    if not failures:
        print("self-test passed: the check fails on each broken list and the blockquote")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default=str(ROOT / "site"), help="built site")
    parser.add_argument("--self-test", action="store_true", help="check the checker")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    site = Path(args.site)
    problems = check_site(site, default_sources(ROOT))
    for problem in problems:
        print(problem)
    pages = len([p for p in site.rglob("*.html") if "assets" not in p.parts])
    print(f"{pages} pages checked, {len(problems)} rendering problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
