"""Every catalog table loads through one loader: a bad entry names the file and its line."""

from pathlib import Path

import pytest

from affinity_addon.catalog.minimums import parse_minimums
from affinity_addon.catalog.profiles import parse_profiles
from affinity_addon.catalog.usage_fields import parse_table
from affinity_addon.catalog.volatile import parse_volatile
from affinity_addon.catalog.yamlsource import load_table


@pytest.mark.parametrize(("text", "parse", "line", "reason"), [
    ("claude-*: 1024\ngpt-*: lots\n", parse_minimums, 2, "bad cache minimum entry"),
    ("profiles:\n  - match: {}\n    ttl: 5m\n  - match: {}\n    min_tokens: many\n",
     parse_profiles, 5, "min_tokens must be 'auto' or a number"),
    ("profiles:\n  - match: {}\n    ttl: soon\n", parse_profiles, 3, "ttl"),
    ("blocks:\n  - name: a\n    pattern: x\n  - name: b\n    pattern: '('\n", parse_volatile, 5,
     "invalid regex"),
    ("blocks:\n  - name: a\n    pattern: x\nroot_masks:\n  - ok\n  - '['\n", parse_volatile, 6,
     "invalid regex"),
    ("apis:\n  anthropic:\n    input: [usage.input_tokens]\n  gemini:\n    input: nope\n",
     parse_table, 4, "apis.gemini.input must be a list"),
])
def test_a_bad_entry_names_the_file_and_line(tmp_path: Path, text, parse, line, reason) -> None:
    path = tmp_path / "table.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=reason) as e:
        load_table(path, parse)
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_a_broken_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "table.yaml"
    path.write_text("- [unclosed\n")
    with pytest.raises(ValueError, match=f"^{path}:"):
        load_table(path, parse_minimums)
