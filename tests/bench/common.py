"""What the benchmarks share: the machine line of their documents and the paper-size repository."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Python's guess where there is none)."""
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def paper_repository(work: Path, *export_args: str, name: str = "model_repository") -> Path:
    """The paper's size with random weights (`salfctl train random --config imagenet-rn50`, trained once
    under ``work``), exported to ``work / name`` with ``export_args`` (default: the python flavour)."""
    exe = str(Path(sys.executable).parent / "salfctl")
    bundle = work / "bundle"
    if not (bundle / "bundle.json").is_file():
        subprocess.run([exe, "train", "random", "--config", "imagenet-rn50", "--out", bundle], check=True,
                       cwd=ROOT, capture_output=True)
    repo = work / name
    subprocess.run([exe, "export", bundle, "--out", repo, "--no-parity", *(export_args or ("--flavour", "python"))],
                   check=True, cwd=ROOT, capture_output=True)
    return repo
