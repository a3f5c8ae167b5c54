"""The core scheduler: stages in order, refusals stop everything, results are reproducible."""

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skyloom.kinds import Captioner, PromptEnhancer, SafetyDecision, SafetyFilter, Sampler, WatermarkDetection, Watermarker
from skyloom.pipeline import STAGES, Pipeline, SafetyRefusal
from skyloom.request import Conditioning, GenerationRequest, RequestError


class RefuseWord(SafetyFilter):
    def __init__(self, word):
        self.word = word
        self.seen = []

    def check_text(self, text):
        self.seen.append(text)
        if self.word in text:
            return SafetyDecision(False, category="test_category", reason=f"contains {self.word!r}")
        return SafetyDecision(True)


class RefuseBrightFrames(SafetyFilter):
    def check_frames(self, frames):
        return SafetyDecision(frames.float().mean() < 255, category="too_bright", reason="mean 255")


class Prefix(PromptEnhancer):
    def enhance(self, prompt):
        return "forbidden " + prompt if "enhance-into-trouble" in prompt else "detailed: " + prompt


class CornerMark(Watermarker):
    def embed(self, frames, payload):
        self.unmarked = frames
        frames = frames.clone()
        frames[:, 0, 0, 0] = payload[0]
        return frames

    def detect(self, frames):
        return WatermarkDetection(True, bytes([int(frames[0, 0, 0, 0])]), 1.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    log = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    return Pipeline.from_pretrained(
        device="cpu", safety_filters=[RefuseWord("forbidden")], watermarkers=[CornerMark()],
        prompt_enhancer=Prefix(), audit_log=log,
    )


def small(prompt="a red circle moves left", **kw):
    return GenerationRequest(prompt, **{"frames": 5, "width": 32, "height": 32, "steps": 2, "seed": 3, **kw})


def test_stages_run_in_order_and_are_timed(pipe):
    result = pipe(small())
    stages = result.record["stages"]
    assert list(stages) == [s for s in STAGES if s != "writing"]
    assert stages["conditioning_safety"] == {"status": "skipped", "reason": "no conditioning media"}
    for name in ("prompt_safety", "prompt_enhancement", "enhanced_prompt_safety", "text_encoding", "sampling", "decoding", "watermarking"):
        assert stages[name]["status"] == "ran" and stages[name]["seconds"] >= 0 and stages[name]["peak_rss_bytes"] > 0
    assert result.record["enhanced_prompt"] == "detailed: a red circle moves left"
    assert tuple(result.frames.shape) == (5, 32, 32, 3) and result.frames.dtype == torch.uint8
    json.dumps(result.record)  # the record is JSON-serialisable


def test_record_names_plugins_and_versions(pipe):
    record = pipe(small()).record
    assert record["plugins"]["sampler"][0] == {"name": "euler", "package": "skyloom", "version": "0.1.0"}
    assert record["plugins"]["text_encoder"][0]["name"] == "minilm"
    assert record["plugins"]["safety_filter"] == [{"name": "RefuseWord", "package": "tests", "version": "", "injected": True}]
    assert record["model"]["trained"] is True and len(record["model"]["hash"]) == 64


def test_refusal_stops_the_request_and_is_audited(pipe):
    with pytest.raises(SafetyRefusal) as refusal:
        pipe(small("a forbidden thing"))
    assert refusal.value.category == "test_category" and refusal.value.stage == "prompt_safety"
    assert "sampling" not in refusal.value.record["stages"]
    lines = [json.loads(line) for line in pipe.audit_log.path.read_text().splitlines()]
    assert any(e["allowed"] is False and e["prompt"] == "a forbidden thing" and e["stage"] == "prompt_safety" for e in lines)


def test_enhanced_prompt_is_checked_again(pipe):
    with pytest.raises(SafetyRefusal) as refusal:
        pipe(small("enhance-into-trouble"))
    assert refusal.value.stage == "enhanced_prompt_safety"


def test_frame_filter_refuses_after_decoding(tmp_path):
    pipe = Pipeline.from_pretrained(device="cpu", safety_filters=[RefuseBrightFrames()], watermarkers=[], audit_log=None)
    pipe.bundle.video_autoencoder.iter_decode = lambda latent, chunk_frames: iter([torch.ones(1, 3, 5, 32, 32)])
    with pytest.raises(SafetyRefusal) as refusal:
        pipe(small())
    assert refusal.value.stage == "frame_safety" and refusal.value.category == "too_bright"


def test_same_seed_same_video_and_no_state_leaks(pipe):
    first = pipe(small(seed=11)).frames
    pipe(small("a blue square", seed=12, sampler="heun"))
    assert torch.equal(pipe(small(seed=11)).frames, first)
    assert not torch.equal(pipe(small(seed=12)).frames, first)


def test_batch_runs_each_request_with_its_own_seed(pipe):
    results = pipe([small(seed=1), small(seed=2, frames=1, width=16, height=24)])
    assert [r.record["seed"] for r in results] == [1, 2]
    assert tuple(results[1].frames.shape) == (1, 24, 16, 3)
    assert torch.equal(results[0].frames, pipe(small(seed=1)).frames)


def test_a_bad_request_in_a_batch_fails_before_any_work(pipe):
    with pytest.raises(ValueError, match="width 30 is not a multiple of 4"):
        pipe([small("a forbidden thing"), small(width=30)])  # the refusal would come first if it ran


def test_watermark_payload_is_the_model_hash_and_the_unmarked_frames_hash(pipe):
    result = pipe(small())
    [(marker, _)] = pipe.watermarkers
    payload = bytes.fromhex(result.record["watermarks"][0]["payload"])
    assert len(payload) == 8 and payload[:4].hex() == result.record["model"]["hash"][:8]
    assert payload[4:] == hashlib.sha256(marker.unmarked.numpy().tobytes()).digest()[:4]
    assert int(result.frames[0, 0, 0, 0]) == payload[0]
    # The same request gives the same marked video (so evaluations repeat); another seed, another id.
    again = pipe(small())
    assert torch.equal(again.frames, result.frames) and again.record["watermarks"] == result.record["watermarks"]
    assert pipe(small(seed=4)).record["watermarks"][0]["payload"][8:] != payload[4:].hex()


def test_skipped_stages_say_why(tmp_path):
    pipe = Pipeline.from_pretrained(device="cpu", safety_filters=[], watermarkers=[], prompt_enhancer=None, audit_log=None)
    stages = pipe(small()).record["stages"]
    assert stages["prompt_safety"] == {"status": "skipped", "reason": "no safety_filter selected"}
    assert stages["frame_safety"]["status"] == "skipped" and stages["watermarking"] == {"status": "skipped", "reason": "no watermarker selected"}


def test_guidance_one_skips_the_unconditional_branch(pipe, monkeypatch):
    calls = []
    forward = pipe.bundle.transformer.forward
    monkeypatch.setattr(pipe.bundle.transformer, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    pipe(small(guidance=1.0))
    assert set(calls) == {1}
    calls.clear()
    pipe(small(guidance=4.0, guidance_interval=(0.0, 1.0)))
    assert set(calls) == {2}


@pytest.mark.parametrize("sampler, guided", [("euler", [1.0, 0.9, 0.8, 0.7]), ("heun", [1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7])])
def test_guidance_interval_guides_only_the_evaluations_inside_it(pipe, monkeypatch, sampler, guided):
    calls = []
    forward = pipe.bundle.transformer.forward
    monkeypatch.setattr(pipe.bundle.transformer, "forward", lambda x, t, *a, **k: calls.append((x.shape[0], float(t[0]))) or forward(x, t, *a, **k))
    # A uniform grid of 10 steps: t = 1, 0.9, ..., 0.1, held in float32 (0.7 as 0.69999999), ends included.
    result = pipe(small(steps=10, sampler=sampler, sampler_options={"shift": 1.0}, guidance=4.0, guidance_interval=(0.7, 1.0)))
    assert result.record["guidance_interval"] == [0.7, 1.0]
    assert [t for batch, t in calls if batch == 2] == pytest.approx(guided)
    assert all(t < 0.7 for batch, t in calls if batch == 1) and len(calls) == (10 if sampler == "euler" else 19)


def test_no_evaluation_inside_the_guidance_interval_is_guidance_one(pipe):
    # The conditional prediction alone at every step, as guidance 1 gives it; so too in a loop's second pass.
    for loop in (False, True):
        unguided = pipe(small(frames=9, steps=4, guidance=4.0, guidance_interval=(0.0, 0.0), loop=loop)).frames
        assert torch.equal(unguided, pipe(small(frames=9, steps=4, guidance=1.0, loop=loop)).frames)


def test_guidance_interval_defaults_to_the_models_then_to_every_step(pipe, monkeypatch):
    monkeypatch.setitem(pipe.defaults, "guidance_interval", [0.25, 1])
    assert pipe(small()).record["guidance_interval"] == [0.25, 1.0]
    monkeypatch.delitem(pipe.defaults, "guidance_interval")
    assert pipe(small()).record["guidance_interval"] == [0.0, 1.0]
    assert pipe(small(guidance_interval=(0.2, 0.4))).record["guidance_interval"] == [0.2, 0.4]


def test_first_frame_conditioning_fixes_the_known_latent(pipe):
    image = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    result = pipe(small(conditioning=(Conditioning(image, 0),), frames=5))
    assert result.record["conditioning"] == [{"start_frame": 0, "frames": 1}]
    # The known latent frame decodes back to (roughly) the image the untrained decoder makes of it.
    vae = pipe.bundle.video_autoencoder
    with torch.inference_mode():
        alone = vae.decode(vae.encode(image.permute(3, 0, 1, 2)[None].float() / 127.5 - 1))
    expected = ((alone[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
    assert (result.frames[0, 1:].float() - expected[1:]).abs().max() <= 2


@settings(max_examples=6)
@given(frames=st.integers(1, 10), w=st.integers(1, 5), h=st.integers(1, 5))
def test_output_shape_equals_the_request(pipe, frames, w, h):
    result = pipe(small(frames=frames, width=8 * w, height=8 * h, steps=1, guidance=1.0))
    assert tuple(result.frames.shape) == (frames, 8 * h, 8 * w, 3)


class CaptionSays(Captioner):
    def __init__(self, caption):
        self.text = caption

    def caption(self, frames, fps):
        return self.text


def test_captions_of_conditioning_media_go_through_the_prompt_filters():
    image = (Conditioning(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), 0),)
    safe = Pipeline.from_pretrained(device="cpu", safety_filters=[RefuseWord("forbidden")], watermarkers=[],
                                    captioner=CaptionSays("a calm lake"), audit_log=None)
    assert safe(small(conditioning=image)).record["conditioning_captions"] == ["a calm lake"]
    unsafe = Pipeline(safe.bundle, safety_filters=[RefuseWord("forbidden")], watermarkers=[],
                      captioner=CaptionSays("a forbidden scene"), audit_log=None, device="cpu")
    with pytest.raises(SafetyRefusal) as refusal:
        unsafe(small(conditioning=image))
    assert refusal.value.stage == "conditioning_safety"
    with pytest.raises(SafetyRefusal) as refusal:  # a video to edit is the caller's media too
        unsafe(small(video=torch.zeros(5, 32, 32, 3, dtype=torch.uint8)))
    assert refusal.value.stage == "conditioning_safety"


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two uint8 videos, in levels."""
    return float((a.float() - b.float()).abs().mean())


def test_video_edit_runs_the_last_strength_share_of_the_steps(pipe, monkeypatch):
    video = pipe(small(prompt="a blue square moves right", seed=1)).frames
    times = []
    forward = pipe.bundle.transformer.forward
    monkeypatch.setattr(pipe.bundle.transformer, "forward", lambda x, t, *a, **k: times.append(float(t[0])) or forward(x, t, *a, **k))
    pipe(small(steps=4, guidance=1.0))
    full, times[:] = list(times), []
    edit = pipe(small(steps=4, guidance=1.0, video=video, strength=0.5))
    assert times == full[2:]  # the last two of four steps, at the same times
    assert edit.record["video_edit"] == {"frames": 5, "strength": 0.5, "steps_run": 2, "start_time": full[2]}


def test_video_edit_at_full_strength_is_text_to_video_and_low_strength_keeps_the_video(pipe):
    video = pipe(small(prompt="a blue square moves right", seed=1, steps=8)).frames
    plain = pipe(small(seed=2, steps=8)).frames
    assert torch.equal(pipe(small(seed=2, steps=8, video=video, strength=1.0)).frames, plain)
    light = pipe(small(seed=2, steps=8, video=video, strength=0.25)).frames
    assert _distance(light, video) < 0.5 * _distance(plain, video)


def test_a_sampler_that_cannot_start_part_way_cannot_edit(pipe):
    class FromNoiseOnly(Sampler):
        config = {}

        def set_timesteps(self, num_steps, *, shift=1.0):
            self.timesteps = torch.linspace(1, 0, num_steps + 1)[:-1]

        def step(self, model_output, timestep, sample, *, generator=None):
            return sample - model_output / len(self.timesteps)

    only = Pipeline(pipe.bundle, sampler=FromNoiseOnly(), safety_filters=[], watermarkers=[], audit_log=None, device="cpu")
    assert only(small()).frames.shape == (5, 32, 32, 3)
    with pytest.raises(RequestError, match="sampler FromNoiseOnly cannot start part-way"):  # before any work
        only(small(video=torch.zeros(5, 32, 32, 3, dtype=torch.uint8)))


def test_loop_keeps_the_rolled_ends_and_generates_the_frames_between(pipe):
    """At the model's own size and steps: at 32x32 and 2 steps its frames all look alike. Guided
    as v23 sampled, where the distances below were measured (v24 has v23's weights)."""
    request = small(frames=9, width=64, height=64, steps=30, seed=4, guidance=3.0, guidance_interval=(0.0, 1.0))
    plain = pipe(request).frames
    looped = pipe(replace(request, loop=True))
    assert looped.record["loop"] == {"rolled_by": 4, "kept_frames": [0, 5, 6, 7, 8], "generated_frames": [1, 2, 3, 4]}
    assert looped.record["stages"]["looping"]["status"] == "ran"
    frames = looped.frames
    assert frames.shape == plain.shape
    # Its first frame is the plain video's frame 4 and its last four are frames 0..3, through the
    # autoencoder once more: so its last frame leads into its first as frame 3 led into frame 4.
    # Frames 5 and 6 are decoded next to the generated latent frame and take some of it (v23:
    # 17-29 levels off); frames 7 and 8 are 9-10 levels off, frame 0 is 7. The frames between
    # are new (29 levels off).
    assert _distance(frames[:1], plain[4:5]) < 14
    assert _distance(frames[7:], plain[2:4]) < 14
    assert _distance(frames[1:5], plain[5:9]) > 20


def test_a_loop_keeps_the_callers_known_frames_where_the_roll_moves_them(pipe):
    """An image-to-video loop: the image, rolled from frame 0 to frame 9, is still known there.
    At the model's own size and steps (at 32x32 and 2 steps it draws nothing like the image)."""
    request = GenerationRequest("a blue square moves up on a gray background", frames=17, width=64, height=64, seed=3)
    image = pipe(replace(request, frames=1, seed=1)).frames
    looped = pipe(replace(request, loop=True, conditioning=(Conditioning(image, 0),)))
    assert looped.record["loop"]["rolled_by"] == 8 and looped.record["loop"]["conditioning_moved_to"] == [9]
    assert looped.record["loop"]["generated_frames"] == [1, 2, 3, 4, 5, 6, 7, 8]  # 9-12 are the image's
    # The latent frame of frames 9-12 decodes to the image from frame 10 on (3.5-7 levels off;
    # the causal decoder blends frame 9 with the frames before it); frames far from it are 16 off.
    assert min(_distance(looped.frames[i], image[0]) for i in range(10, 13)) < 6
    assert _distance(looped.frames[4], image[0]) > 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_autocast_generates_the_requested_video(pipe, dtype):
    low = Pipeline(pipe.bundle, safety_filters=[], watermarkers=[], audit_log=None, device="cpu", autocast_dtype=dtype)
    frames = low(small(seed=5)).frames
    full = Pipeline(pipe.bundle, safety_filters=[], watermarkers=[], audit_log=None, device="cpu")(small(seed=5)).frames
    assert frames.shape == full.shape and frames.dtype == torch.uint8
    # The same video up to low-precision rounding: mean absolute pixel difference under 4 levels.
    assert (frames.float() - full.float()).abs().mean() < 4


def test_bad_autocast_dtype_is_refused(pipe):
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        Pipeline(pipe.bundle, autocast_dtype=torch.int8, audit_log=None, device="cpu")


def test_upscale_resizes_before_frame_safety_and_watermarking(pipe):
    seen = []

    class Sizes(SafetyFilter):
        def check_frames(self, frames):
            seen.append(tuple(frames.shape))
            return SafetyDecision(True)

    big = Pipeline(pipe.bundle, safety_filters=[Sizes()], watermarkers=[CornerMark()], audit_log=None, device="cpu")
    result = big(small(upscale=3))
    assert tuple(result.frames.shape) == (5, 96, 96, 3) and seen == [(5, 96, 96, 3)]
    assert result.record["upscale"] == 3 and result.record["width"] == 32



def test_bad_sampler_options_fail_before_any_work(pipe):
    with pytest.raises(ValueError, match="sampler_options .* do not fit sampler 'euler'"):
        pipe([small("a forbidden thing"), small(sampler_options={"warp": 9})])


def test_spreadspectrum_marks_a_64x64_generation_and_verify_finds_it(tmp_path):
    """The real watermarker on the embedded model's own size, through save (H.264 CRF 18 and
    C2PA) and verify. The decoder's output is swapped for a shapes-world clip, what the trained
    model makes (the untrained one makes noise); a static square on black is the hardest."""
    from skyloom.datasets.shapes import make_clip
    from skyloom.registry import get_registry
    from skyloom.verify import verify

    pipe = Pipeline.from_pretrained(device="cpu", safety_filters=[], watermarkers=["spreadspectrum"],
                                    prompt_enhancer=None, audit_log=None)
    clip = make_clip(0, 19)[1]  # (17, 64, 64, 3): a yellow square on black
    pixels = clip.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
    pipe.bundle.video_autoencoder.iter_decode = lambda latent, chunk_frames: iter([pixels])
    result = pipe(GenerationRequest("a yellow square stays still", frames=17, width=64, height=64, steps=1, seed=0))
    assert result.record["stages"]["watermarking"]["status"] == "ran"
    assert "too_small_for" not in result.record["stages"]["watermarking"]
    [mark] = result.record["watermarks"]
    assert mark["watermarker"] == "spreadspectrum" and not torch.equal(result.frames, clip)
    marker = get_registry().create("watermarker", "spreadspectrum")
    report = verify(result.save(tmp_path / "gen.mp4"), watermarkers=[("spreadspectrum", marker)])
    assert report["verdict"] == "signed_intact"
    assert report["watermark"]["payload"] == mark["payload"] and report["watermark"]["matches_manifest"] is True

    # Below the 48-pixel side the mark needs (the same decoder output, cropped to 40 x 40 by the
    # pipeline), the stage is skipped and says how to fix it.
    small_result = pipe(GenerationRequest("a red circle", frames=1, width=40, height=40, steps=1, seed=0))
    reason = small_result.record["stages"]["watermarking"]["reason"]
    assert "smaller than the 48-pixel side" in reason and "--upscale 2" in reason
    assert small_result.record["watermarks"] == []
