"""The relabels of a dataset: `<root>/labels.csv` (columns path,label), beside the class
folders and versioned with them. Prepare gives each listed image the label the file names
instead of its folder's; the image itself never moves. `lensflow ingest` writes the file."""

from __future__ import annotations

import csv
from pathlib import Path

from components.core import paths
from components.core.errors import UserError

COLUMNS = ("path", "label")


def read(root: Path, classes: list[str]) -> dict[str, str]:
    """{path relative to the root: label} of <root>/labels.csv ({} when there is none). Every
    problem is one line of one UserError: a missing column, a class the data does not have, an
    image listed twice, a path that is not a file under the root."""
    file = paths.overrides_file(root)
    if not file.exists():
        return {}
    found, problems = {}, []
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise UserError(f"{file}: expected the header 'path,label', got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            path, label = row["path"] or "", row["label"] or ""
            if label not in classes:
                problems.append(f"{file}:{line}: unknown class {label!r} for {path}")
            elif path in found:
                problems.append(f"{file}:{line}: {path} is listed twice")
            elif not (root / path).is_file() or len(Path(path).parts) < 2:
                problems.append(f"{file}:{line}: {path} is not an image in a class folder")
            else:
                found[path] = label
    if problems:
        raise UserError("\n".join(problems))
    return found


def write(root: Path, relabels: dict[str, str]) -> None:
    """<root>/labels.csv holding `relabels`, sorted by path (atomically)."""
    file = paths.overrides_file(root)
    with paths.atomic(file) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(sorted(relabels.items()))
