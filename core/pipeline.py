"""The core scheduler: runs a GenerationRequest through the stages, each a call to plugins of one kind.

    prompt_safety -> prompt_enhancement -> enhanced_prompt_safety -> conditioning_safety
    -> text_encoding -> sampling -> decoding -> looping -> frame_safety -> watermarking
    -> (GenerationResult.save) writing

Load once, call many times: no state is kept between requests except caches of pure functions
(text encodings). docs/architecture.md walks through one request.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from skyloom import __version__
from skyloom.audit import AuditLog, default_audit_log_path
from skyloom.bundle import DEFAULT_MODEL_DIR, ModelBundle, load_bundle
from skyloom.provenance import ProvenanceSettings, write_signed_media
from skyloom.kinds import Captioner, PromptEnhancer, SafetyDecision, SafetyFilter, Sampler, Watermarker
from skyloom.registry import Registry, get_registry
from skyloom.request import Conditioning, GenerationRequest, RequestError, check_guidance_interval, last_latent_frame_start
from skyloom.sampling import classifier_free_guidance, guided_at, resolution_shift
from skyloom.video_io import resize_frames

STAGES = (
    "prompt_safety",
    "prompt_enhancement",
    "enhanced_prompt_safety",
    "conditioning_safety",
    "text_encoding",
    "sampling",
    "decoding",
    "looping",
    "frame_safety",
    "watermarking",
    "writing",
)

DEFAULT = object()  # "use the model's or the registry's default" for plugin arguments
DECODE_CHUNK_FRAMES = 4  # latent frames per decoder call: bounds decoder memory for long videos


class SafetyRefusal(Exception):
    """A safety filter refused the request; nothing was generated or written."""

    def __init__(self, decision: SafetyDecision, record: dict):
        self.decision = decision
        self.category = decision.category
        self.stage = decision.stage
        self.record = record
        super().__init__(
            f"refused by safety filter {decision.filter!r} at stage {decision.stage}: "
            f"{decision.category or 'policy'}: {decision.reason}"
        )


@dataclass
class GenerationResult:
    frames: torch.Tensor  # (T, H, W, 3) uint8
    fps: float
    record: dict = field(default_factory=dict)  # JSON-serialisable: everything but the frames

    def save(self, path: str | Path, *, crf: int = 18, provenance: ProvenanceSettings | None = None) -> Path:
        """Write the video (.mp4) or single frame (.png) atomically, with a signed C2PA manifest
        carrying the generation recipe (docs/responsible.md); records the writing stage."""
        path = Path(path)
        settings = provenance or ProvenanceSettings.from_env()
        with _measure(self.record, "writing"):
            write_signed_media(path, self.frames, self.fps, self.record, settings=settings, crf=crf)
        self.record["output"] = str(path)
        self.record["provenance"] = {"c2pa": True, "include_prompt": settings.include_prompt}
        return path


def _plugin_entry(registry: Registry, kind: str, name: str | None, obj: object) -> dict:
    if name is not None:
        info = registry.get(kind, name)
        return {"name": info.name, "package": info.package, "version": info.version}
    module = type(obj).__module__
    return {"name": type(obj).__name__, "package": module.split(".")[0], "version": "", "injected": True}


def _resolve(registry: Registry, kind: str, choice, config: dict | None = None):
    """A plugin given by name (built through the registry) or as a ready object -> (object, record entry)."""
    if isinstance(choice, str):
        info = registry.get(kind, choice)
        return info.factory(**(config or {})), _plugin_entry(registry, kind, info.name, None)
    return choice, _plugin_entry(registry, kind, None, choice)


def _peak_rss_reset() -> None:
    # Linux: writing 5 to clear_refs resets the VmHWM peak, so each stage reports its own peak.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _measure(record: dict, stage: str):
    """Record a stage's wall time and peak memory (CUDA allocator peak, or process peak RSS)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _peak_rss_reset()
    start = time.perf_counter()
    entry = {"status": "ran"}
    record.setdefault("stages", {})[stage] = entry
    try:
        yield entry
    finally:
        if cuda:
            torch.cuda.synchronize()
            entry["peak_cuda_memory_bytes"] = torch.cuda.max_memory_allocated()
        entry["seconds"] = round(time.perf_counter() - start, 4)
        entry["peak_rss_bytes"] = _peak_rss_bytes()


def _skip(record: dict, stage: str, reason: str) -> None:
    record.setdefault("stages", {})[stage] = {"status": "skipped", "reason": reason}


def check_text(filters: Iterable[tuple[SafetyFilter, dict]], text: str, stage: str) -> list[SafetyDecision]:
    """Every (filter, record entry) pair's decision on `text`; filters that do not judge text are left out."""
    decisions = []
    for flt, entry in filters:
        decision = flt.check_text(text)
        if decision is not None:
            decision.filter, decision.stage = entry["name"], stage
            decisions.append(decision)
    return decisions


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    """Text-to-video generation with one model bundle and a set of plugins.

    Plugins may be given by registered name or as objects (an application can inject its own
    safety filter or watermarker without packaging it). Defaults: every registered safety
    filter and watermarker; the bundle's sampler, prompt enhancer and captioner.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        registry: Registry | None = None,
        device: str | torch.device | None = None,
        sampler: str | Sampler | None = None,
        safety_filters: Iterable[str | SafetyFilter] | object = DEFAULT,
        watermarkers: Iterable[str | Watermarker] | object = DEFAULT,
        prompt_enhancer: str | PromptEnhancer | None | object = DEFAULT,
        captioner: str | Captioner | None | object = DEFAULT,
        audit_log: str | Path | None | object = DEFAULT,
        offload: bool | None = None,
        autocast_dtype: torch.dtype | None | object = DEFAULT,
    ):
        self.bundle = bundle
        self.registry = registry or get_registry()
        self.device = torch.device(device) if device is not None else _default_device()
        self.defaults = dict(bundle.defaults)
        self.sampler = sampler  # None: per request, else the bundle's default
        reg = self.registry
        if safety_filters is DEFAULT:
            safety_filters = reg.names("safety_filter")
        if watermarkers is DEFAULT:
            watermarkers = reg.names("watermarker")
        if prompt_enhancer is DEFAULT:
            prompt_enhancer = self.defaults.get("prompt_enhancer")
        if captioner is DEFAULT:
            captioner = self.defaults.get("captioner")
        self.safety_filters = [_resolve(reg, "safety_filter", f) for f in safety_filters]
        self.watermarkers = [_resolve(reg, "watermarker", w) for w in watermarkers]
        self.prompt_enhancer = _resolve(reg, "prompt_enhancer", prompt_enhancer) if prompt_enhancer else None
        self.captioner = _resolve(reg, "captioner", captioner) if captioner else None
        if audit_log is DEFAULT:
            audit_log = default_audit_log_path()
        self.audit_log = AuditLog(audit_log) if audit_log else None
        # Mixed precision: bf16 on CUDA by default; None runs in float32.
        if autocast_dtype is DEFAULT:
            autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
        self.autocast_dtype = autocast_dtype
        # Offload idle components to the CPU when generating on a GPU.
        self.offload = (self.device.type == "cuda") if offload is None else offload
        self.bundle.transformer.to(self.device)
        if not self.offload:
            self.bundle.video_autoencoder.to(self.device)
            self.bundle.text_encoder.to(self.device)

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, *, registry: Registry | None = None, device=None, **kwargs):
        """Load a model directory (default: the embedded model shipped with skyloom)."""
        registry = registry or get_registry()
        device = torch.device(device) if device is not None else _default_device()
        bundle = load_bundle(Path(model) if model else DEFAULT_MODEL_DIR, registry, device="cpu")
        return cls(bundle, registry=registry, device=device, **kwargs)

    # -- public API ---------------------------------------------------------------------------

    def __call__(
        self,
        requests: GenerationRequest | Sequence[GenerationRequest],
        *,
        progress: bool | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate one video per request. Returns a result, or a list for a list of requests."""
        single = isinstance(requests, GenerationRequest)
        batch = [requests] if single else list(requests)
        if progress is None:
            progress = sys.stdout.isatty()  # the bar itself goes to stderr
        prepared = [self._prepare(r) for r in batch]  # validate every request before running any
        results = [self._generate(r, progress) for r in prepared]
        return results[0] if single else results

    def check_prompt(self, text: str, stage: str = "prompt") -> list[SafetyDecision]:
        """Run only the prompt safety filters; returns every filter's decision."""
        return check_text(self.safety_filters, text, stage)

    # -- stages -------------------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> GenerationRequest:
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
        keys = ("frames", "width", "height", "fps", "steps", "guidance", "guidance_interval")
        defaults = {k: self.defaults[k] for k in keys if k in self.defaults}
        defaults["sampler"] = self.sampler if isinstance(self.sampler, str) else self.defaults.get("sampler", "euler")
        request = request.with_defaults(defaults)
        vae = self.bundle.video_autoencoder
        request.validate(spatial_multiple=vae.spatial_compression, temporal_multiple=vae.temporal_compression)
        request = replace(request, guidance_interval=check_guidance_interval(request.guidance_interval))  # a JSON list: a tuple
        if self.sampler is None or isinstance(self.sampler, str):
            factory = self.registry.get("sampler", request.sampler).factory  # unknown names fail before any work
            try:
                inspect.signature(factory).bind(**request.sampler_options)
            except TypeError as error:
                raise RequestError(f"sampler_options {request.sampler_options} do not fit sampler {request.sampler!r}: {error}") from None
        else:
            factory = type(self.sampler)
        if request.video is not None and isinstance(factory, type) and factory.set_begin_step is Sampler.set_begin_step:
            raise RequestError(
                f"sampler {factory.__name__} cannot start part-way through its steps, so it cannot edit a video; "
                "choose one of skyloom's built-in samplers (see `skyloom plugins`)"
            )
        return request

    def _base_record(self, request: GenerationRequest) -> dict:
        b = self.bundle
        plugins = {
            "text_encoder": [_plugin_entry(self.registry, "text_encoder", b.index["text_encoder"]["plugin"], None)],
            "video_autoencoder": [_plugin_entry(self.registry, "video_autoencoder", b.index["video_autoencoder"]["plugin"], None)],
            "safety_filter": [e for _, e in self.safety_filters],
            "watermarker": [e for _, e in self.watermarkers],
            "prompt_enhancer": [self.prompt_enhancer[1]] if self.prompt_enhancer else [],
            "captioner": [self.captioner[1]] if self.captioner else [],
        }
        return {
            "skyloom_version": __version__,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "frames": request.frames,
            "width": request.width,
            "height": request.height,
            "fps": request.fps,
            "steps": request.steps,
            "guidance": request.guidance,
            "guidance_interval": list(request.guidance_interval),
            "upscale": request.upscale,
            "model": {"name": b.name, "path": str(b.path), "hash": b.model_hash, "trained": b.trained},
            "device": str(self.device),
            "plugins": plugins,
            "safety": [],
            "watermarks": [],
            "stages": {},
        }

    def _judge(self, record: dict, decisions: list[SafetyDecision]) -> None:
        record["safety"].extend(vars(d).copy() for d in decisions)
        if self.audit_log is not None:
            self.audit_log.append([
                {"prompt": record["prompt"], "seed": record["seed"], "model": record["model"]["hash"], **vars(d)}
                for d in decisions
            ])
        for decision in decisions:
            if not decision.allowed:
                raise SafetyRefusal(decision, record)

    def _text_safety(self, record: dict, stage: str, text: str) -> None:
        if not self.safety_filters:
            return _skip(record, stage, "no safety_filter selected")
        with _measure(record, stage):
            decisions = self.check_prompt(text, stage)
        self._judge(record, decisions)

    def _generate(self, request: GenerationRequest, progress: bool) -> GenerationResult:
        record = self._base_record(request)
        bundle = self.bundle
        vae = bundle.video_autoencoder

        # 1. Prompt safety, enhancement, safety on the enhanced prompt.
        self._text_safety(record, "prompt_safety", request.prompt)
        prompt = request.prompt
        if self.prompt_enhancer is None:
            _skip(record, "prompt_enhancement", "no prompt_enhancer selected")
            _skip(record, "enhanced_prompt_safety", "no prompt_enhancer selected")
        else:
            with _measure(record, "prompt_enhancement"):
                prompt = self.prompt_enhancer[0].enhance(prompt)
            record["enhanced_prompt"] = prompt
            self._text_safety(record, "enhanced_prompt_safety", prompt)

        # 2. Captions of the caller's media (known frames, a video to edit) go through the prompt filters too.
        media = [c.media for c in request.conditioning] + ([request.video] if request.video is not None else [])
        if not media:
            _skip(record, "conditioning_safety", "no conditioning media")
        elif self.captioner is None or not self.safety_filters:
            _skip(record, "conditioning_safety", "no captioner selected" if self.captioner is None else "no safety_filter selected")
        else:
            for frames in media:
                caption = self.captioner[0].caption(frames, request.fps)
                record.setdefault("conditioning_captions", []).append(caption)
                self._text_safety(record, "conditioning_safety", caption)

        # 3. Text encoding: the prompt and the negative prompt (the unconditional branch).
        encoder = bundle.text_encoder
        with _measure(record, "text_encoding"), self._on_device(encoder):
            emb = encoder.encode([prompt, request.negative_prompt])
            tokens, mask = emb.tokens.to(self.device), emb.mask.to(self.device)

        # 4. Sampling in latent space: from noise, or from the noised `video` (SDEdit).
        sampler_choice = self.sampler if self.sampler is not None and not isinstance(self.sampler, str) else request.sampler
        sampler, entry = _resolve(self.registry, "sampler", sampler_choice, request.sampler_options)
        record["plugins"]["sampler"] = [entry]
        latent_shape = vae.latent_shape(request.frames, request.height, request.width)
        known = self._encode_conditioning(request, latent_shape)
        if request.conditioning:
            record["conditioning"] = [{"start_frame": c.start_frame, "frames": int(c.media.shape[0])} for c in request.conditioning]
        shift = float(request.sampler_options.get("shift", self._timestep_shift(latent_shape)))
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        record["sampler"] = {"name": entry["name"], "config": dict(getattr(sampler, "config", {})), "shift": shift}
        start = None
        if request.video is not None:
            with torch.inference_mode(), self._on_device(vae):
                start = self._encode_frames(request.video, request.height, request.width)
        with _measure(record, "sampling"):
            sample, start_time = self._sample(sampler, request, shift, (tokens, mask), known, generator, progress, start)
        if start is not None:
            record["video_edit"] = {"frames": int(request.video.shape[0]), "strength": request.strength,
                                    "steps_run": request.edit_steps, "start_time": start_time}

        # 5. Decoding to pixels.
        with _measure(record, "decoding"):
            frames = self._decode(sample, request)

        # 5b. A loop: the video's end is connected to its start by generating the frames between.
        if not request.loop:
            _skip(record, "looping", "not a loop")
        else:
            with _measure(record, "looping"):
                frames, record["loop"] = self._close_loop(frames, request, sampler, shift, (tokens, mask), generator, progress)
        if request.upscale > 1:  # before frame safety and watermarking: they see what is written
            frames = resize_frames(frames, request.width * request.upscale, request.height * request.upscale)

        # 6. Frame safety.
        frame_filters = self.safety_filters
        if not frame_filters:
            _skip(record, "frame_safety", "no safety_filter selected")
        else:
            decisions = []
            with _measure(record, "frame_safety"):
                for flt, entry in frame_filters:
                    decision = flt.check_frames(frames)
                    if decision is not None:
                        decision.filter, decision.stage = entry["name"], "frame_safety"
                        decisions.append(decision)
            self._judge(record, decisions)

        # 7. Watermarking: model id + a content id, the unmarked frames' hash: copies of different
        # videos can be told apart, and the same request still gives the same frames.
        side = min(frames.shape[1], frames.shape[2])
        too_small = [(m, e) for m, e in self.watermarkers if side < getattr(m, "min_frame_side", 1)]
        if not self.watermarkers:
            _skip(record, "watermarking", "no watermarker selected")
        elif len(too_small) == len(self.watermarkers):
            need = min(m.min_frame_side for m, _ in too_small)
            factor = -(-need // min(request.width, request.height))  # the --upscale that reaches `need`
            _skip(record, "watermarking", f"frames {frames.shape[2]}x{frames.shape[1]} are smaller than the "
                  f"{need}-pixel side the watermarkers need; upscale the video (--upscale {factor})")
        else:
            with _measure(record, "watermarking") as entry:
                content_id = hashlib.sha256(frames.contiguous().numpy().tobytes()).digest()[:4]
                payload = bytes.fromhex(bundle.model_hash[:8]) + content_id
                for marker, plugin in self.watermarkers:
                    if (marker, plugin) in too_small:
                        entry.setdefault("too_small_for", []).append(plugin["name"])
                        continue
                    frames = marker.embed(frames, payload)
                    record["watermarks"].append({"watermarker": plugin["name"], "payload": payload.hex()})
        return GenerationResult(frames=frames, fps=float(request.fps), record=record)

    def _timestep_shift(self, latent_shape) -> float:
        """The bundle's `shift` at its default size, growing with the square root of the token
        count at other sizes (SD3, Open-Sora 1.2): longer and larger videos need more noise."""
        d = self.defaults
        base_shape = self.bundle.video_autoencoder.latent_shape(d.get("frames", 17), d.get("height", 64), d.get("width", 64))
        return resolution_shift(
            self.bundle.transformer.config.num_tokens(*latent_shape[1:]),
            base_tokens=self.bundle.transformer.config.num_tokens(*base_shape[1:]),
            base_shift=float(d.get("shift", 1.0)),
        )

    def _encode_frames(self, media: torch.Tensor, height: int, width: int, *, behind_copy: bool = False) -> torch.Tensor:
        """(T, H, W, 3) uint8 frames, resized to height x width -> normalised latents (1, C, T', H', W').

        behind_copy: encode behind a copy of the first frame and drop its latent, so that the
        frames take the places of latent frames >= 1 (each covering `temporal_compression`
        frames) rather than the first latent frame, which covers one frame alone.
        """
        vae = self.bundle.video_autoencoder
        ct = vae.temporal_compression
        media = media.permute(3, 0, 1, 2).float().div(127.5).sub(1)  # (3, T, H, W) in [-1, 1]
        media = F.interpolate(media, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        if behind_copy:
            media = torch.cat([media[:, :1], media], dim=1)
        pad = -(media.shape[1] - 1) % ct  # the encoder takes 1 + k·ct frames: repeat the last
        media = torch.cat([media, media[:, -1:].expand(-1, pad, -1, -1)], dim=1)
        latent = vae.encode(media[None].to(self.device)).float()
        return latent[:, :, 1:] if behind_copy else latent

    def _encode_conditioning(self, request: GenerationRequest, latent_shape):
        """Known frames -> (cond_latent (1, C, T', H', W'), cond_mask (1, T')) on the device."""
        C, T, H, W = latent_shape
        cond_latent = torch.zeros((1, C, T, H, W), device=self.device)
        cond_mask = torch.zeros((1, T), device=self.device)
        if not request.conditioning:
            return cond_latent, cond_mask
        ct = self.bundle.video_autoencoder.temporal_compression
        with torch.inference_mode(), self._on_device(self.bundle.video_autoencoder):
            for cond in request.conditioning:
                start = cond.start_frame if cond.start_frame >= 0 else request.frames + cond.start_frame
                # Latent frame 0 covers pixel frame 0; latent frame j >= 1 covers pixel frames (j-1)·ct+1 .. j·ct.
                first = 0 if start == 0 else 1 + (start - 1) // ct  # on a boundary: validate() checked
                latent = self._encode_frames(cond.media, request.height, request.width, behind_copy=start != 0)
                n = min(latent.shape[2], T - first)
                cond_latent[:, :, first : first + n] = latent[:, :, :n]
                cond_mask[:, first : first + n] = 1
        return cond_latent, cond_mask

    def _sample(self, sampler: Sampler, request: GenerationRequest, shift: float, text, known, generator, progress: bool,
                start: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Denoise a latent video (1, C, T', H', W'): from pure noise, or from the clean latents
        `start` noised to where the last `request.strength` share of the steps begins (SDEdit).
        `text` is the (tokens, mask) of the prompt and the negative prompt; `known` the
        (cond_latent, cond_mask) of the conditioning frames. Returns the sample and the time
        it started from (1 = pure noise)."""
        transformer = self.bundle.transformer
        tokens, mask = text
        cond_latent, cond_mask = known
        with torch.inference_mode(), self._autocast():
            noise = torch.randn(cond_latent.shape, generator=generator).to(self.device)
            sampler.set_timesteps(request.steps, shift=shift)
            timesteps, start_time = sampler.timesteps, 1.0
            if start is None:
                sample = noise
            else:
                first = sampler.set_begin_step(request.steps - request.edit_steps)
                timesteps = timesteps[first:]
                start_time = float(timesteps[0])
                sample = (1 - start_time) * start + start_time * noise  # x_t = (1 - t)·x_0 + t·noise
            for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
                if guided_at(t, request.guidance, request.guidance_interval):
                    x = sample.expand(2, -1, -1, -1, -1)
                    tt = torch.full((2,), float(t), device=self.device)
                    v = transformer(x, tt, tokens, mask, cond_latent.expand(2, -1, -1, -1, -1), cond_mask.expand(2, -1))
                    velocity = classifier_free_guidance(v[:1], v[1:], request.guidance)
                else:
                    tt = torch.full((1,), float(t), device=self.device)
                    velocity = transformer(sample, tt, tokens[:1], mask[:1], cond_latent, cond_mask)
                sample = sampler.step(velocity.float(), t, sample, generator=generator)
            # Known latent frames are exactly the conditioning, not the model's reconstruction of it.
            sample = torch.where(cond_mask.view(1, 1, -1, 1, 1).bool(), cond_latent, sample)
        return sample, start_time

    def _decode(self, sample: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        """Latents -> (frames, height, width, 3) uint8, a few latent frames at a time; only uint8 frames accumulate."""
        vae = self.bundle.video_autoencoder
        with torch.inference_mode(), self._autocast(), self._on_device(vae):
            chunks = []
            latent = sample.to(next(vae.parameters()).dtype)
            for pixels in vae.iter_decode(latent, chunk_frames=DECODE_CHUNK_FRAMES):  # (1, 3, t, H', W') in [-1, 1]
                pixels = pixels[0, :, :, : request.height, : request.width]
                chunks.append(((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
            return torch.cat(chunks, dim=1)[:, : request.frames].permute(1, 2, 3, 0).contiguous()  # (T, H, W, 3)

    def _close_loop(self, frames: torch.Tensor, request: GenerationRequest, sampler, shift, text, generator, progress):
        """Make `frames` play as a loop, as Sora makes loops by connecting a video to itself.

        Rolled by m, the video's seam (last frame -> first) moves to its middle, and its ends,
        frames m and m-1 of the original, follow each other. The rolled video's first frame and
        its last latent frame (the last `temporal_compression` frames at most) are kept as known
        frames, and the frames between are generated anew, connecting one to the other. The
        caller's known frames move with the roll (GenerationRequest.loop_roll) and stay known.
        Returns the looped frames and a record of what was kept.
        """
        n, ct = request.frames, self.bundle.video_autoencoder.temporal_compression
        tail = last_latent_frame_start(n, ct)  # validate() ensures tail > ct
        m, moved = request.loop_roll(ct)  # validate() ensured there is one
        rolled = torch.roll(frames, -m, dims=0)
        bridge = GenerationRequest(
            request.prompt, request.negative_prompt, frames=n, width=request.width, height=request.height,
            steps=request.steps, guidance=request.guidance, guidance_interval=request.guidance_interval, seed=request.seed,
            conditioning=(Conditioning(rolled[:1], 0), Conditioning(rolled[tail:], tail), *moved),
        )
        latent_shape = self.bundle.video_autoencoder.latent_shape(n, request.height, request.width)
        known = self._encode_conditioning(bridge, latent_shape)
        sample, _ = self._sample(sampler, bridge, shift, text, known, generator, progress)
        looped = self._decode(sample, bridge)
        latent_known = known[1][0].bool().tolist()  # latent frame 0 is frame 0, j >= 1 frames (j-1)·ct+1 .. j·ct
        generated = [f for f in range(1, tail) if not latent_known[1 + (f - 1) // ct]]
        record = {"rolled_by": m, "kept_frames": [0, *range(tail, n)], "generated_frames": generated}
        if moved:
            record["conditioning_moved_to"] = [c.start_frame for c in moved]
        return looped, record

    @contextlib.contextmanager
    def _on_device(self, component):
        """With offloading, a component visits the device only for its own stage, even on error."""
        if not self.offload:
            yield component
            return
        component.to(self.device)
        try:
            yield component
        finally:
            component.to("cpu")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
