"""A real third-party package (tests/plugin_package) installed with pip is seen by the API and the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent / "plugin_package"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """pip-install the example package into its own directory, put on PYTHONPATH by the tests."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "package"
    shutil.copytree(PACKAGE, source)  # setuptools writes build/ and *.egg-info beside the sources
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
    )
    return target


def run(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_api_sees_the_installed_plugins(site):
    code = (
        "from skyloom.registry import Registry; r = Registry.load(strict=True);"
        "i = r.get('sampler', 'midpoint'); print(i.name, i.package, i.version);"
        "print(r.create('safety_filter', 'example-blocklist').check_text('a forbidden-word').allowed)"
    )
    proc = run(site, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["example-midpoint", "skyloom-example-plugins", "0.2.0", "False"]


def test_cli_lists_the_installed_plugins(site):
    proc = run(site, "-m", "skyloom", "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    assert rows[("sampler", "example-midpoint")]["package"] == "skyloom-example-plugins"
    assert rows[("sampler", "example-midpoint")]["version"] == "0.2.0"
    assert rows[("safety_filter", "example-blocklist")]["kind"] == "safety_filter"
    assert rows[("sampler", "euler")]["package"] == "skyloom"
    text = run(site, "-m", "skyloom", "plugins").stdout
    assert "example-midpoint (aliases: midpoint)  [skyloom-example-plugins 0.2.0]" in text
