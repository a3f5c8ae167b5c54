"""The compiled extension: what it reports, and the message when it is missing."""

import subprocess
import sys

import skyloom._C as C


def test_build_info_describes_the_build():
    info = C.build_info()
    assert set(info) >= {"compiler", "cuda", "cuda_archs", "torch_version"}
    import torch

    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert info["cuda"] == bool(info["cuda_archs"])


def test_import_without_the_extension_says_how_to_build_it():
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'skyloom._C': raise ImportError('simulated: not built')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import skyloom\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "skyloom._C could not be loaded" in last and "make install" in last and "pip install --no-build-isolation -e ." in last
