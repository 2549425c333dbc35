"""Which source a benchmark ran: the commit checked out, and the git tree of the working tree as it
is (a device machine gets the working tree with the session's first .git, so its HEAD can be older
than what ran). `git log --format='%h %T'` finds the commit whose tree is `git_tree`."""
from __future__ import annotations

import os
import subprocess
import tempfile


def _git(*args: str, env: dict | None = None) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, env=env, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_version() -> dict:
    commit = _git("rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:  # a scratch index: the checkout's own stays as it is
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"))
        _git("add", "-A", env=env)
        tree = _git("write-tree", env=env)
    return {"git_commit": commit or None, "git_tree": tree or None,
            "git_tree_is_commit": bool(tree) and tree == _git("rev-parse", "HEAD^{tree}")}
