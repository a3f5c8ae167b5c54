"""Loads plugins with pluggy and keeps the components they register, by kind and name.

Built-in plugins (DEFAULT_PLUGINS) and third-party packages (entry-point group `skyloom`)
go through the same hooks. The registry is the only place that knows where a component
came from: its plugin module, distribution package and version.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Iterable

import pluggy

from skyloom import hookspecs
from skyloom.kinds import KINDS

ENTRY_POINT_GROUP = "skyloom"

# Built-in plugins, registered through the same hooks as third-party ones.
DEFAULT_PLUGINS = (
    "skyloom.plugins.text_encoder.minilm",
    "skyloom.plugins.text_encoder.hf",
    "skyloom.plugins.video_autoencoder.causal3d",
    "skyloom.plugins.sampler.euler",
    "skyloom.plugins.sampler.heun",
    "skyloom.plugins.sampler.dpmpp_2m",
    "skyloom.plugins.sampler.ddim",
    "skyloom.plugins.sampler.ddpm",
    "skyloom.plugins.safety_filter.policy",
    "skyloom.plugins.safety_filter.hashlist",
    "skyloom.plugins.watermarker.spreadspectrum",
    "skyloom.plugins.prompt_enhancer.caption_style",
    "skyloom.plugins.captioner.shapes",
)

# The hook that registers each kind, e.g. "sampler" -> "register_samplers".
HOOK_FOR_KIND = {kind: f"register_{kind}s" for kind in KINDS}


class UnknownPluginError(KeyError):
    """No component of this kind has this name."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        listing = ", ".join(self.valid) if self.valid else "none are installed"
        super().__init__(f"unknown {kind} {name!r}; valid names: {listing}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class UnknownKindError(KeyError):
    def __init__(self, kind: str):
        super().__init__(f"unknown plugin kind {kind!r}; valid kinds: {', '.join(KINDS)}")

    def __str__(self) -> str:
        return self.args[0]


class PluginClashError(RuntimeError):
    """Two plugins registered the same name (or alias) for one kind."""


class PluginLoadError(RuntimeError):
    """A plugin failed to import or register, and loading is strict."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    factory: Callable[..., object] = field(repr=False)
    aliases: tuple[str, ...] = ()
    plugin: str = ""  # the pluggy plugin (module or entry point) that registered it
    package: str = ""  # its distribution package
    version: str = ""

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "aliases": list(self.aliases),
            "plugin": self.plugin,
            "package": self.package,
            "version": self.version,
        }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_list(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


class Registry:
    """Components by kind and name. Build one with `Registry.load()` (or `get_registry()`)."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self.load_errors: list[tuple[str, str]] = []  # (plugin, error) for plugins that failed
        self.plugin_manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.plugin_manager.add_hookspecs(hookspecs)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        *,
        strict: bool | None = None,
        disabled: Iterable[str] | None = None,
        builtins: Iterable[str] = DEFAULT_PLUGINS,
        entry_points: bool = True,
        extra_plugins: Iterable[object] = (),
    ) -> "Registry":
        """Load built-in and installed plugins.

        strict: a plugin that fails to import raises PluginLoadError instead of a warning
            (default: SKYLOOM_STRICT_PLUGINS).
        disabled: plugin or component names to skip (default: SKYLOOM_DISABLE_PLUGINS=a,b).
        extra_plugins: objects or modules with hookimpls, registered like any plugin.
        """
        registry = cls()
        strict = _env_flag("SKYLOOM_STRICT_PLUGINS") if strict is None else strict
        blocked = _env_list("SKYLOOM_DISABLE_PLUGINS") if disabled is None else set(disabled)
        pm = registry.plugin_manager
        sources: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)

        def fail(plugin: str, error: BaseException) -> None:
            message = f"skyloom plugin {plugin!r} failed to load: {type(error).__name__}: {error}"
            if strict:
                raise PluginLoadError(message + " (strict plugin loading is on)") from error
            registry.load_errors.append((plugin, f"{type(error).__name__}: {error}"))
            warnings.warn(message + "; the other plugins still load", RuntimeWarning, stacklevel=3)

        for module_name in builtins:
            short = module_name.rsplit(".", 1)[-1]
            if module_name in blocked or short in blocked:
                continue
            try:
                pm.register(importlib.import_module(module_name), name=module_name)
            except Exception as error:
                fail(module_name, error)
                continue
            sources[module_name] = ("skyloom", _version("skyloom"))

        if entry_points:
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in blocked or pm.get_plugin(ep.name) is not None:
                    continue
                dist = ep.dist.name if ep.dist else ep.module
                try:
                    pm.register(ep.load(), name=ep.name)
                except Exception as error:
                    fail(f"{ep.name} ({dist})", error)
                    continue
                sources[ep.name] = (dist, ep.dist.version if ep.dist else "")

        for obj in extra_plugins:
            name = pm.register(obj)
            package = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
            sources[name] = (package.split(".")[0], "")

        # A hook implementation with no matching spec (a misspelt hook name) fails loudly: the
        # plugin is dropped with a warning, or loading stops when strict.
        while True:
            try:
                pm.check_pending()
                break
            except pluggy.PluginValidationError as error:
                name = pm.get_name(error.plugin) or repr(error.plugin)
                pm.unregister(error.plugin)
                fail(name, error)

        for kind, hook_name in HOOK_FOR_KIND.items():
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                package, version = sources.get(impl.plugin_name, ("", ""))

                def register(name, factory, *, aliases=(), _kind=kind, _impl=impl, _p=package, _v=version):
                    if name in blocked or f"{_kind}:{name}" in blocked:
                        return
                    registry.add(PluginInfo(_kind, name, factory, tuple(aliases), _impl.plugin_name, _p, _v))

                try:
                    impl.function(register=register)
                except PluginClashError:
                    raise
                except Exception as error:
                    fail(impl.plugin_name, error)
        return registry

    def add(self, info: PluginInfo) -> None:
        """Add one component; a name or alias already taken in its kind is a PluginClashError."""
        if info.kind not in self._by_kind:
            raise UnknownKindError(info.kind)
        for claimed in (info.name, *info.aliases):
            owner = self._owner(info.kind, claimed)
            if owner is not None:
                raise PluginClashError(
                    f"two plugins claim the {info.kind} name {claimed!r}: "
                    f"{owner.name!r} from package {owner.package or owner.plugin!r} (plugin {owner.plugin}) and "
                    f"{info.name!r} from package {info.package or info.plugin!r} (plugin {info.plugin}); "
                    "uninstall one, or block one with SKYLOOM_DISABLE_PLUGINS"
                )
        self._by_kind[info.kind][info.name] = info
        for alias in info.aliases:
            self._aliases[info.kind][alias] = info.name

    def _owner(self, kind: str, name: str) -> PluginInfo | None:
        if name in self._by_kind[kind]:
            return self._by_kind[kind][name]
        if name in self._aliases[kind]:
            return self._by_kind[kind][self._aliases[kind][name]]
        return None

    # -- lookup ----------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> PluginInfo:
        """The component of `kind` called `name` (or one of its aliases)."""
        if kind not in self._by_kind:
            raise UnknownKindError(kind)
        info = self._owner(kind, name)
        if info is None:
            raise UnknownPluginError(kind, name, self._by_kind[kind])
        return info

    def create(self, kind: str, name: str, **config) -> object:
        """Build the component `name` of `kind` with `config` as keyword arguments."""
        return self.get(kind, name).factory(**config)

    def names(self, kind: str) -> list[str]:
        if kind not in self._by_kind:
            raise UnknownKindError(kind)
        return sorted(self._by_kind[kind])

    def all(self) -> list[PluginInfo]:
        """Every component, ordered by kind (as in KINDS) then name."""
        return [self._by_kind[kind][name] for kind in KINDS for name in sorted(self._by_kind[kind])]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use with the environment's settings."""
    global _registry
    if _registry is None:
        _registry = Registry.load()
    return _registry
