"""Git and DVC facts for lineage, and the two DVC commands the pipeline runs itself.

DVC is driven through its own command line (`python -m dvc`), the interface it documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from components.core import paths
from components.core.errors import UserError


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def data_md5(source: Path) -> str:
    """The data's identity: the DVC hash of a tracked data folder (from its .dvc file); for a
    folder DVC does not track, `manifest:` + the fingerprint prepare computed of its files
    (the same files give the same value on every machine); 'untracked' before prepare ran."""
    dvc_file = source.parent / f"{source.name}.dvc"
    if dvc_file.exists():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        if "md5" in outs[0]:
            return str(outs[0]["md5"])
    meta = json.loads(paths.META.read_text()) if paths.META.exists() else {}
    if meta.get("source") == str(source) and "fingerprint" in meta:
        return f"manifest:{meta['fingerprint'][:24]}"  # MLflow dataset digests: <= 36 chars
    return "untracked"


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
