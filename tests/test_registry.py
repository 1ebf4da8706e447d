"""The registry leaf: built-ins load on first use, plugins replace them, config stays at the bottom."""

import subprocess
import sys

import pytest


@pytest.fixture
def registry_module(tmp_path, monkeypatch):
    """A registry whose built-ins live in a module of their own, as the layers' do."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "holder_mod.py").write_text(
        "from trinity.registry import Registry\nREG = Registry('thing', 'builtins_mod')\n"
    )
    (tmp_path / "builtins_mod.py").write_text(
        "from holder_mod import REG\nREG.register('a')('builtin-a')\nREG.register('b')('builtin-b')\n"
    )
    yield
    for name in ("holder_mod", "builtins_mod"):
        sys.modules.pop(name, None)


def test_builtins_load_on_first_lookup(registry_module):
    from holder_mod import REG

    assert "builtins_mod" not in sys.modules
    assert "a" in REG and REG.get("b") == "builtin-b"
    assert REG.names() == ["a", "b"] and list(REG) == ["a", "b"]
    with pytest.raises(KeyError, match="unknown thing 'c'"):
        REG.get("c")


def test_a_plugin_entry_replaces_the_builtin_whenever_it_registers(registry_module):
    from holder_mod import REG

    REG.register("a")("plugin-a")  # before anything looked the built-ins up
    assert REG.get("a") == "plugin-a" and REG.get("b") == "builtin-b"


def test_config_imports_no_layer_above_it():
    code = (
        "import sys, trinity.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('trinity.')"
        " and not m.startswith(('trinity.config', 'trinity.registry'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
