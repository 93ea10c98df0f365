"""Where the tests find the real agents they drive (npm packages, installed outside the repo).

Claude Code: $AFFINITY_CLAUDE, else where `.ci/run` installs it
(`${XDG_CACHE_HOME:-~/.cache}/affinity-agents/claude`), else a `claude` on PATH. Resolved at
import, before any test points HOME at a temporary folder. Missing, the tests that need it skip,
unless AFFINITY_REQUIRE_AGENTS=1 (CI), where that is a failure.
"""

import os
import shutil
from pathlib import Path

import pytest

_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
INSTALL_DIR = _CACHE / "affinity-agents" / "claude"


def _find_claude() -> Path | None:
    for c in (os.environ.get("AFFINITY_CLAUDE", ""),
              str(INSTALL_DIR / "node_modules" / ".bin" / "claude"),
              shutil.which("claude") or ""):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


CLAUDE = _find_claude()


def claude_or_skip() -> Path:
    if CLAUDE is not None:
        return CLAUDE
    how = (f"set AFFINITY_CLAUDE, or npm install --prefix {INSTALL_DIR} "
           "@anthropic-ai/claude-code")
    if os.environ.get("AFFINITY_REQUIRE_AGENTS") == "1":
        pytest.fail(f"Claude Code is not installed ({how})")
    pytest.skip(f"Claude Code is not installed ({how})")
