"""README.md: its Python examples run as written, and its links resolve.

Every ```python block of README.md runs in a fresh Python process from an
empty directory, with the repository on PYTHONPATH; the test fails if it
raises. A block whose preceding line is `<!-- no-test -->` is skipped: only
for a block that needs data or hardware that CI lacks.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SKIP_MARK = "<!-- no-test -->"
MAX_README_BYTES = 12_000
TIMEOUT_S = 600


def fenced_blocks(text):
    """`(language, code, skipped)` for each fenced code block of markdown."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        previous = next(
            (line.strip() for line in reversed(lines[:i]) if line.strip()), ""
        )
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"unclosed code block at line {i + 1}")
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append((match.group(1), code, previous == SKIP_MARK))
        i = end + 1
    return blocks


def prose(text):
    """Markdown without its fenced blocks and inline code spans."""
    text = re.sub(r"^```.*?^```\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def headings_of(path):
    """GitHub's heading anchors of a markdown file (outside code blocks)."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```\s*$", "", text, flags=re.S | re.M)
    seen = {}
    found = set()
    for line in text.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        heading = match.group(1).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def python_blocks():
    return [
        (code, skipped)
        for language, code, skipped in fenced_blocks(
            README.read_text(encoding="utf-8")
        )
        if language == "python"
    ]


def run_block(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def test_fenced_blocks_finds_languages_code_and_skip_marks():
    text = (
        "intro\n```python\nprint(1)\n```\n\n<!-- no-test -->\n\n"
        "```python\nraise SystemExit(1)\n```\n```bash\nls\n```\n"
    )
    assert fenced_blocks(text) == [
        ("python", "print(1)\n", False),
        ("python", "raise SystemExit(1)\n", True),
        ("bash", "ls\n", False),
    ]
    with pytest.raises(ValueError, match="unclosed"):
        fenced_blocks("```python\nprint(1)\n")


def test_a_failing_block_fails(tmp_path):
    result = run_block("raise RuntimeError('broken example')\n", tmp_path)
    assert result.returncode != 0
    assert "broken example" in result.stderr


def test_readme_has_a_tested_example_that_reports_epsilon():
    blocks = python_blocks()
    tested = [code for code, skipped in blocks if not skipped]
    assert tested, "README.md has no tested ```python example"
    assert any("epsilon" in code for code in tested)
    # The skip mark is for blocks that need absent data or hardware only.
    assert len(tested) > len(blocks) - len(tested)


@pytest.mark.parametrize(
    "index", range(len(python_blocks())), ids=lambda i: f"block{i}"
)
def test_readme_python_block_runs(index, tmp_path):
    code, skipped = python_blocks()[index]
    if skipped:
        pytest.skip("marked <!-- no-test --> in README.md")
    result = run_block(code, tmp_path)
    assert result.returncode == 0, (
        f"README.md python block {index} failed:\n{code}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    )
    if "epsilon" in code:
        assert re.search(r"epsilon[ =:]+\d", result.stdout), result.stdout


def test_readme_is_at_most_12000_bytes():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md has {size} bytes"


@pytest.mark.parametrize(
    "path", [README] + DOCS, ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_relative_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in headings_of(linked), (
                f"{path.name}: {target}: no heading with anchor #{anchor}"
            )
