"""The Python snippets of README.md and docs/*.md, by name (``<!-- snippet: NAME -->`` before a
fenced ``python`` block): the tests run them as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippet(name: str) -> tuple[str, str]:
    """The code of snippet ``name`` and the page it is on (exactly one page has it)."""
    found = []
    for page in PAGES:
        pattern = rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```"
        found += [(m.group(1), page.name) for m in re.finditer(pattern, page.read_text(), re.S)]
    assert len(found) == 1, f"snippet {name!r} found {len(found)} times in README.md and docs/"
    return found[0]
