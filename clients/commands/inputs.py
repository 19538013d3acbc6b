"""What the commands read and write: image arguments (folders expanded to their images) and a distinct
output name per input, claimed before any request so nothing is overwritten without ``--force``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from salf.cli import EXIT_USAGE, CliError

Images = Annotated[List[Path], typer.Argument(exists=True, help="Image files, or folders (walked recursively, "
                                                                "in path order).")]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def folder_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files under ``folder`` with ``suffixes`` (any case), recursive, sorted by path."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)


def expand_inputs(paths: list[Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Files as given; each folder replaced by its files with ``suffixes`` (recursive, sorted by path).
    A folder with none of them is a usage error."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = folder_files(p, suffixes)
            if not found:
                raise typer.BadParameter(f"{p} holds no {', '.join(suffixes)} file")
            out.extend(found)
        else:
            out.append(p)
    return out


def output_names(images: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: its file stem, or, when two stems collide, its path relative to
    the inputs' common folder with separators as ``__`` (``a/x.png``, ``b/x.png`` -> ``a__x``, ``b__x``)."""
    import os

    stems = [p.stem for p in images]
    if len(set(stems)) == len(stems):
        return {p: p.stem for p in images}
    resolved = [p.resolve() for p in images]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p, r in zip(images, resolved):
        name = "__".join(r.relative_to(common).with_suffix("").parts)
        if name in used:  # a.png and a.jpg in one folder, or one file given twice
            name = "__".join(r.relative_to(common).parts).replace(".", "_")
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names[p] = name
    return names


def claim_outputs(out: Path, names: dict[Path, str], suffixes: tuple[str, ...], force: bool) -> None:
    """Refuse (exit 2, before any request) when an output file already exists, unless ``force``."""
    existing = [out / f"{name}{suffix}" for name in names.values() for suffix in suffixes
                if (out / f"{name}{suffix}").exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise CliError(f"{shown} already exist(s): pass --force to overwrite, or choose another --out", EXIT_USAGE)
    out.mkdir(parents=True, exist_ok=True)


def slug(name: str) -> str:
    """``name`` (a concept) as a file-name part."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "concept"
