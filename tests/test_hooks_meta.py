"""Every hook is documented in docs/plugins.md and exercised by a test (datasette's meta-tests)."""

import inspect
import re
from pathlib import Path

import pytest

from skyloom import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_"))


def test_there_is_one_hook_per_kind():
    from skyloom.kinds import KINDS

    assert HOOKS == sorted(f"register_{kind}s" for kind in KINDS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^### `{hook}\(register\)`", docs, re.M), f"docs/plugins.md has no section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    # A plugin implementing the hook, loaded by some test: a built-in or a test plugin.
    sources = [p.read_text() for p in (ROOT / "plugins").rglob("*.py")]
    sources += [p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name]
    assert any(f"def {hook}(" in s for s in sources), f"no plugin implements {hook}"
    tests = [p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    kind = hook[len("register_"):-1]
    assert any(f'"{kind}"' in t or f"'{kind}'" in t for t in tests), f"no test looks up a {kind}"
