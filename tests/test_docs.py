"""The documentation's links resolve, and its references to the GSPO paper (arXiv 2507.18071) name
the right parts of it: the paper has three figures (Fig. 2: clip fractions; Fig. 3: Routing
Replay), its §4.3 is GSPO-token, and expert volatility is §5.3."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def text_files(root: Path) -> list[Path]:
    """Where the paper is cited: the docs, the configs' comments, the code's docstrings."""
    return [*markdown_files(root), *sorted((root / "conf").rglob("*.yaml")),
            *sorted((root / "gspo_cli").rglob("*.py")), *sorted((root / "bench").glob("*.py"))]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def broken_links(root: Path) -> list[str]:
    """Relative links of the Markdown files whose file, or heading within it, does not exist."""
    broken = []
    for doc in markdown_files(root):
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            linked = doc.parent / path if path else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(root)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{doc.relative_to(root)}: {target} (no such heading)")
    return broken


# Lines that cite the GSPO paper wrongly (issue 28): a fourth figure, or §4.3 (GSPO-token) for
# expert volatility or Routing Replay.
STALE = [
    (re.compile(r"\b(Fig\.?|Figure)\s*4\b|Figures 1[-–]4"), re.compile(r"paper|GSPO"), "the GSPO paper has three figures"),
    (re.compile(r"§\s*4\.3"), re.compile(r"volatil|routing|Routing Replay|expert", re.I),
     "expert volatility and Routing Replay are §5.3; §4.3 is GSPO-token"),
]


def stale_paper_references(root: Path) -> list[str]:
    found = []
    for path in text_files(root):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for wrong, context, why in STALE:
                if wrong.search(line) and context.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {why}: {line.strip()[:120]}")
    return found


def test_relative_links_and_their_headings_exist():
    assert not broken_links(ROOT), "\n".join(broken_links(ROOT))


def test_the_gspo_paper_is_cited_by_its_own_sections_and_figures():
    assert not stale_paper_references(ROOT), "\n".join(stale_paper_references(ROOT))
