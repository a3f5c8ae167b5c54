"""The hooks a skyloom plugin implements: one `register_<kind>s(register)` hook per kind.

Each hook is called once per process, when the registry loads plugins. It receives a
`register(name, factory, *, aliases=())` callback; `factory(**config)` must build an object
that implements the kind's interface from skyloom.kinds. Every hook is collected from every
plugin (none is firstresult), so any number of packages can add components of one kind.
"""

from typing import Callable, Iterable, Protocol

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("skyloom")
hookimpl = HookimplMarker("skyloom")


class Register(Protocol):
    def __call__(self, name: str, factory: Callable[..., object], *, aliases: Iterable[str] = ()) -> None: ...


@hookspec
def register_text_encoders(register: Register) -> None:
    """Register `text_encoder` factories; each builds a skyloom.kinds.TextEncoder."""


@hookspec
def register_video_autoencoders(register: Register) -> None:
    """Register `video_autoencoder` factories; each builds a skyloom.kinds.VideoAutoencoder."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register `sampler` factories; each builds a skyloom.kinds.Sampler."""


@hookspec
def register_safety_filters(register: Register) -> None:
    """Register `safety_filter` factories; each builds a skyloom.kinds.SafetyFilter."""


@hookspec
def register_watermarkers(register: Register) -> None:
    """Register `watermarker` factories; each builds a skyloom.kinds.Watermarker."""


@hookspec
def register_prompt_enhancers(register: Register) -> None:
    """Register `prompt_enhancer` factories; each builds a skyloom.kinds.PromptEnhancer."""


@hookspec
def register_captioners(register: Register) -> None:
    """Register `captioner` factories; each builds a skyloom.kinds.Captioner."""
