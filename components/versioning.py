"""Git and DVC facts for lineage, and the two DVC commands the pipeline runs itself.

DVC is driven through its own command line (`python -m dvc`), the interface it documents.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from components.config import UserError


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def data_md5(source: Path) -> str:
    """The DVC hash of a tracked data folder (from its .dvc file), or 'untracked'."""
    dvc_file = source.parent / f"{source.name}.dvc"
    if not dvc_file.exists():
        return "untracked"
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def in_dvc_repo() -> bool:
    return Path(".dvc").is_dir()


def dvc_add(target: Path) -> None:
    """Track (or re-version) a data folder: writes <target>.dvc and caches the files."""
    _dvc("add", str(target))


def dvc_commit() -> None:
    """Record the current outputs of every dvc.yaml stage in dvc.lock (so `dvc repro` is a no-op
    after `lensflow run` made the same outputs from the same params)."""
    _dvc("commit", "--force")


def _dvc(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"`dvc {' '.join(args)}` failed: {lines[0]}")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
