"""The documentation: every relative link and image in README.md and docs/ resolves (files and
`#anchors`), and the README stays a short front page that opens with the set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 220

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
INLINE_CODE = re.compile(r"`[^`]*`")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[str]:
    """The lines GitHub renders as Markdown: HTML comments and fenced code blocks removed
    (a link inside them is not a link)."""
    lines, in_fence = [], False
    for line in HTML_COMMENT.sub("", text).splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    return lines


def link_targets(text: str) -> list[str]:
    """Targets of every `[text](target)` and `![alt](target)`, inline code ignored."""
    return [m.group(1) for line in prose_lines(text)
            for m in LINK.finditer(INLINE_CODE.sub("", line))]


def heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading: link markup reduced to its text, lowercase, punctuation
    other than '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated slugs get -1, -2, ... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = heading_slug(match.group(1))
            repeat = counts.get(slug, 0)
            counts[slug] = repeat + 1
            found.add(f"{slug}-{repeat}" if repeat else slug)
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `path` whose file is missing, outside `root`, or whose `#anchor`
    is no heading of the Markdown file it points into."""
    broken = []
    for target in link_targets(path.read_text(encoding="utf-8")):
        if target.lower().startswith(EXTERNAL):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif not resolved.is_relative_to(root.resolve()):
            broken.append(f"{target}: outside the repository")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.name}")
    return broken


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_links_every_reference_file() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in link_targets(README.read_text(encoding="utf-8"))}
    reference = [p for p in MARKDOWN_FILES if p.parent == ROOT / "docs" and p.name != "README.md"]
    assert len(reference) >= 9
    assert [p.name for p in reference if p.resolve() not in linked] == []


def test_readme_is_a_short_front_page_opening_with_the_setup_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    fences = [i for i, line in enumerate(lines) if FENCE.match(line)]
    first_block = "\n".join(lines[fences[0] + 1:fences[1]])
    assert "make demo" in first_block and "make test" in first_block


def test_github_slugs_of_hand_written_headings() -> None:
    assert heading_slug("Browsing latents: `gsae inspect`") == "browsing-latents-gsae-inspect"
    assert heading_slug('JSON schema (`schema: "gsae.eval/2"`)') == "json-schema-schema-gsaeeval2"
    assert heading_slug("Results: TopK against g-SAEs") == "results-topk-against-g-saes"
    assert heading_slug("The [gsae](x.md) folder_name") == "the-gsae-folder_name"


def test_repeated_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Cost\n\n## Cost\n\n```\n# not a heading\n```\n## Cost\n")
    assert anchors(page) == {"cost", "cost-1", "cost-2"}


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "a.md").write_text("# Title here\n\ntext\n")
    (repo / "plot.png").write_bytes(b"")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = repo / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#title-here) ![ok](plot.png) [ok](#top) [web](https://x.y)\n"
        "# Top\n"
        "[missing](docs/b.md) ![missing](nope.png) [bad anchor](docs/a.md#title)\n"
        "`[code](not/checked.md)` <!-- [comment](not/checked.md) -->\n"
        "```\n[fenced](not/checked.md)\n```\n"
        "[outside](../outside.md) [self](#nowhere)\n"
    )
    assert broken_links(page, repo) == [
        "docs/b.md: no such file",
        "nope.png: no such file",
        "docs/a.md#title: no heading #title in a.md",
        "../outside.md: outside the repository",
        "#nowhere: no heading #nowhere in README.md",
    ]
