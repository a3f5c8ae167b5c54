"""Plugin discovery: built-ins, entry points, aliases, unknown names, clashes, broken and blocked plugins."""

import textwrap

import pytest

from skyloom.hookspecs import hookimpl
from skyloom.kinds import KINDS, PromptEnhancer
from skyloom.registry import (
    DEFAULT_PLUGINS,
    HOOK_FOR_KIND,
    PluginClashError,
    PluginLoadError,
    Registry,
    UnknownKindError,
    UnknownPluginError,
)


def install_fake_dist(root, dist, version, modules: dict, entry_points: dict):
    """Lay out an installed distribution (dist-info with entry points) on sys.path `root`."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {module}" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[skyloom]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


ENHANCER_MODULE = """
from skyloom.hookspecs import hookimpl
from skyloom.kinds import PromptEnhancer

class Shout(PromptEnhancer):
    def enhance(self, prompt):
        return prompt.upper()

@hookimpl
def register_prompt_enhancers(register):
    register("{name}", Shout, aliases=("{alias}",))
"""


class Upper(PromptEnhancer):
    def enhance(self, prompt):
        return prompt.upper()


class InlinePlugin:
    @hookimpl
    def register_prompt_enhancers(self, register):
        register("upper", Upper, aliases=("caps",))


def test_every_builtin_loads_without_errors():
    registry = Registry.load(strict=True, entry_points=False, disabled=())
    assert registry.load_errors == []
    assert {info.plugin for info in registry.all()} == set(DEFAULT_PLUGINS)
    assert all(info.package == "skyloom" for info in registry.all())


def test_hook_for_every_kind():
    assert set(HOOK_FOR_KIND) == set(KINDS)


def test_lookup_by_name_and_alias():
    registry = Registry.load(builtins=(), entry_points=False, extra_plugins=[InlinePlugin()])
    assert registry.get("prompt_enhancer", "upper").name == "upper"
    assert registry.get("prompt_enhancer", "caps").name == "upper"
    assert registry.create("prompt_enhancer", "caps").enhance("hi") == "HI"
    assert registry.names("prompt_enhancer") == ["upper"]


def test_unknown_name_lists_valid_names():
    registry = Registry.load(builtins=(), entry_points=False, extra_plugins=[InlinePlugin()])
    with pytest.raises(UnknownPluginError) as error:
        registry.get("prompt_enhancer", "lower")
    assert isinstance(error.value, KeyError)
    assert "unknown prompt_enhancer 'lower'" in str(error.value) and "upper" in str(error.value)
    with pytest.raises(UnknownKindError, match="valid kinds: text_encoder"):
        registry.get("upscaler", "x")


def test_entry_point_plugin_is_discovered_with_its_package(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, "acme-shout", "1.2.3", {"acme_shout": ENHANCER_MODULE.format(name="shout", alias="loud")}, {"shout": "acme_shout"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry.load(builtins=(), disabled=())
    info = registry.get("prompt_enhancer", "loud")
    assert (info.name, info.package, info.version, info.plugin) == ("shout", "acme-shout", "1.2.3", "shout")


def test_two_packages_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, "acme-one", "1.0", {"acme_one": ENHANCER_MODULE.format(name="shout", alias="a1")}, {"one": "acme_one"})
    install_fake_dist(tmp_path, "acme-two", "2.0", {"acme_two": ENHANCER_MODULE.format(name="yell", alias="shout")}, {"two": "acme_two"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginClashError) as error:
        Registry.load(builtins=(), disabled=())
    assert "acme-one" in str(error.value) and "acme-two" in str(error.value) and "'shout'" in str(error.value)


def test_broken_plugin_warns_and_the_rest_still_load(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, "acme-broken", "0.1", {"acme_broken": "raise ImportError('no module named frobnicate')"}, {"broken": "acme_broken"})
    install_fake_dist(tmp_path, "acme-shout", "1.0", {"acme_shout": ENHANCER_MODULE.format(name="shout", alias="loud")}, {"shout": "acme_shout"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match=r"'broken \(acme-broken\)' failed to load: ImportError: no module named frobnicate"):
        registry = Registry.load(builtins=(), disabled=(), strict=False)
    assert registry.names("prompt_enhancer") == ["shout"]
    assert registry.load_errors == [("broken (acme-broken)", "ImportError: no module named frobnicate")]


def test_strict_loading_makes_a_broken_plugin_fatal(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, "acme-broken", "0.1", {"acme_broken": "raise ImportError('boom')"}, {"broken": "acme_broken"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SKYLOOM_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="acme-broken.*boom"):
        Registry.load(builtins=(), disabled=())


def test_misspelt_hook_fails_loudly():
    class Misspelt:
        @hookimpl
        def register_sampler(self, register):  # missing the final "s"
            pass

    with pytest.warns(RuntimeWarning, match="unknown hook 'register_sampler'"):
        registry = Registry.load(builtins=(), entry_points=False, extra_plugins=[Misspelt(), InlinePlugin()], strict=False)
    assert registry.names("prompt_enhancer") == ["upper"]  # the rest still load
    with pytest.raises(PluginLoadError, match="unknown hook 'register_sampler'"):
        Registry.load(builtins=(), entry_points=False, extra_plugins=[Misspelt()], strict=True)


def test_disable_plugins_by_plugin_or_component_name(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, "acme-shout", "1.0", {"acme_shout": ENHANCER_MODULE.format(name="shout", alias="loud")}, {"shout": "acme_shout"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SKYLOOM_DISABLE_PLUGINS", "shout, euler")
    registry = Registry.load()
    assert "shout" not in registry.names("prompt_enhancer")
    assert "euler" not in registry.names("sampler") and "heun" in registry.names("sampler")
    monkeypatch.setenv("SKYLOOM_DISABLE_PLUGINS", "sampler:heun")
    registry = Registry.load(entry_points=False)
    assert "heun" not in registry.names("sampler") and "euler" in registry.names("sampler")


class EveryKind:
    """One component of each kind, registered through each hook."""

    @hookimpl
    def register_text_encoders(self, register):
        register("t-test", dict)

    @hookimpl
    def register_video_autoencoders(self, register):
        register("v-test", dict)

    @hookimpl
    def register_samplers(self, register):
        register("s-test", dict)

    @hookimpl
    def register_safety_filters(self, register):
        register("f-test", dict)

    @hookimpl
    def register_watermarkers(self, register):
        register("w-test", dict)

    @hookimpl
    def register_prompt_enhancers(self, register):
        register("p-test", dict)

    @hookimpl
    def register_captioners(self, register):
        register("c-test", dict)


@pytest.mark.parametrize(
    "kind, name",
    [("text_encoder", "t-test"), ("video_autoencoder", "v-test"), ("sampler", "s-test"), ("safety_filter", "f-test"),
     ("watermarker", "w-test"), ("prompt_enhancer", "p-test"), ("captioner", "c-test")],
)
def test_each_hook_registers_its_kind(kind, name):
    registry = Registry.load(builtins=(), entry_points=False, extra_plugins=[EveryKind()])
    assert registry.names(kind) == [name]
    assert registry.create(kind, name, size=3) == {"size": 3}  # config reaches the factory
    assert registry.get(kind, name).package == "tests"
