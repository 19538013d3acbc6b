"""serving/ and the client commands must never import torch (the serving image has none)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_and_clients_do_not_import_torch():
    code = (
        "import sys, importlib, pkgutil, serving\n"
        "for m in pkgutil.iter_modules(serving.__path__):\n"
        "    importlib.import_module('serving.' + m.name)\n"
        "import clients.client, clients.commands, salf.figures, salf.cli\n"
        "for m in pkgutil.iter_modules(clients.commands.__path__):\n"
        "    importlib.import_module('clients.commands.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok', len([n for n in sys.modules if n.startswith('serving.')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
