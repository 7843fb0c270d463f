"""docs/api.md's examples run as written (in order, one namespace), and the docs' links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_api_examples_run(tmp_path, monkeypatch, one_thread):
    blocks = _python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)  # the first block writes runs/api-demo here
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the failing block
            pytest.fail(f"docs/api.md block {i + 1} failed: {type(e).__name__}: {e}")
    assert (tmp_path / "runs" / "api-demo" / "model.safetensors").is_file()


@pytest.mark.parametrize("doc", ["README.md", "docs/science.md", "docs/design.md", "docs/api.md"])
def test_doc_links_resolve(doc):
    """Every relative link [..](file#anchor) in the docs names a file that exists and a heading in it."""
    def anchors(path: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}

    source = ROOT / doc
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        path = (source.parent / file).resolve() if file else source
        if not path.exists():
            bad.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(target)
    assert not bad, f"{doc}: broken links {bad}"
