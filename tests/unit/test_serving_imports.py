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


def test_salfctl_starts_without_torch_installed():
    """The [serve] image has no torch at all: with torch made unimportable, the whole `salfctl` CLI still
    builds (every command registered) and `salfctl serve --help` answers."""
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith(('torch.', 'torchvision', 'open_clip', 'timm')):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from typer.testing import CliRunner\n"
        "from clients.salfctl import app\n"
        "r = CliRunner().invoke(app, ['serve', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert '--triton' in r.output and '--cache' in r.output\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
