"""verify(): the manifest and the watermark together, on the cases a user meets."""

import json

import pytest
import torch

from skyloom.kinds import WatermarkDetection, Watermarker
from skyloom import provenance
from skyloom.provenance import ProvenanceError, ProvenanceSettings, manifest_definition, recipe_from_record, sign_file
from skyloom.verify import VERDICTS, format_report, verify
from skyloom.video_io import VideoIOError, read_video
from tests.test_provenance import (  # noqa: F401  (isolated_environment is an autouse fixture)
    flat_video,
    flip_byte_in_box,
    isolated_environment,
    make_video,
    pipeline_record,
    reencode,
    settings,
)

PAYLOAD = bytes.fromhex("c0ffee42")


class BlockPairWatermarker(Watermarker):
    """A deliberately simple test mark: each payload bit brightens one 8x8 block and darkens its
    neighbour (or the other way round). It survives H.264 at normal quality on flat frames."""

    payload_bytes = 4
    block = 8
    strength = 12

    def _pairs(self, frames: torch.Tensor):
        t, h, w, _ = frames.shape
        blocks = [(y, x) for y in range(0, h - self.block + 1, self.block) for x in range(0, w - self.block + 1, self.block)]
        return list(zip(blocks[0::2], blocks[1::2]))[: 8 * self.payload_bytes]

    def embed(self, frames: torch.Tensor, payload: bytes) -> torch.Tensor:
        bits = [(byte >> (7 - i)) & 1 for byte in payload for i in range(8)]
        out = frames.to(torch.int16).clone()
        b = self.block
        for bit, ((y0, x0), (y1, x1)) in zip(bits, self._pairs(frames)):
            sign = self.strength if bit else -self.strength
            out[:, y0 : y0 + b, x0 : x0 + b] += sign
            out[:, y1 : y1 + b, x1 : x1 + b] -= sign
        return out.clamp(0, 255).to(torch.uint8)

    def detect(self, frames: torch.Tensor) -> WatermarkDetection:
        luma = frames.float().mean(dim=(0, 3))  # (H, W), averaged over time and channels
        b = self.block
        diffs = torch.tensor([
            luma[y0 : y0 + b, x0 : x0 + b].mean() - luma[y1 : y1 + b, x1 : x1 + b].mean()
            for (y0, x0), (y1, x1) in self._pairs(frames)
        ])
        confidence = float((diffs.abs() / (2 * self.strength)).clamp(max=1).min())  # the weakest bit decides
        bits = (diffs > 0).int().tolist()
        payload = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
        detected = confidence > 0.5
        return WatermarkDetection(detected=detected, payload=payload if detected else None, confidence=confidence)


class NeverFinds(Watermarker):
    def embed(self, frames, payload):
        return frames

    def detect(self, frames):
        return WatermarkDetection(detected=False, payload=None, confidence=0.1)


MARKERS = [("never", NeverFinds()), ("blockpair", BlockPairWatermarker())]


def watermarked_frames() -> torch.Tensor:
    return BlockPairWatermarker().embed(flat_video(), PAYLOAD)


def sign(tmp_path, settings, frames: torch.Tensor, name: str):
    source = make_video(tmp_path / f"unsigned-{name}", frames)
    record = pipeline_record()
    record["watermarks"] = [{"watermarker": "blockpair", "payload": PAYLOAD.hex()}]
    sign_file(source, tmp_path / name, recipe_from_record(record, include_prompt=False), settings=settings)
    return tmp_path / name


def test_the_test_watermarker_survives_encoding_and_is_absent_from_plain_video(tmp_path):
    marker = BlockPairWatermarker()
    frames, _ = read_video(make_video(tmp_path / "marked.mp4", watermarked_frames()))
    assert marker.detect(frames) == WatermarkDetection(True, PAYLOAD, marker.detect(frames).confidence)
    plain, _ = read_video(make_video(tmp_path / "plain.mp4"))
    assert not marker.detect(plain).detected and marker.detect(plain).confidence < 0.1


def test_signed_and_watermarked_is_signed_intact(tmp_path, settings):
    report = verify(sign(tmp_path, settings, watermarked_frames(), "ai.mp4"), watermarkers=MARKERS, settings=settings)
    assert report["verdict"] == "signed_intact"
    assert report["file"] == str(tmp_path / "ai.mp4")
    manifest, watermark = report["manifest"], report["watermark"]
    assert manifest["present"] and manifest["valid"] and manifest["trusted"] and manifest["errors"] == []
    assert manifest["recipe"]["seed"] == 1234
    assert watermark["detected"] and watermark["watermarker"] == "blockpair"
    assert watermark["payload"] == PAYLOAD.hex() and watermark["confidence"] > 0.5
    assert watermark["matches_manifest"] is True
    assert watermark["checked"] == ["never", "blockpair"]
    json.dumps(report)  # what `skyloom verify --json` prints


def test_signed_without_watermark(tmp_path, settings):
    report = verify(sign(tmp_path, settings, flat_video(), "unmarked.mp4"), watermarkers=MARKERS, settings=settings)
    assert report["verdict"] == "signed_no_watermark"
    assert report["manifest"]["valid"] and not report["watermark"]["detected"]
    assert report["watermark"]["payload"] is None and report["watermark"]["watermarker"] is None


def test_changed_video_is_tampered_even_with_the_watermark(tmp_path, settings):
    signed = sign(tmp_path, settings, watermarked_frames(), "ai.mp4")
    flip_byte_in_box(signed, "mdat")
    report = verify(signed, watermarkers=MARKERS, settings=settings)
    assert report["verdict"] == "tampered"
    assert report["manifest"]["present"] and not report["manifest"]["valid"]
    assert any("mismatch" in error for error in report["manifest"]["errors"])


def test_reencoded_video_loses_the_manifest_but_keeps_the_watermark(tmp_path, settings):
    stripped = reencode(sign(tmp_path, settings, watermarked_frames(), "ai.mp4"), tmp_path / "reupload.mp4")
    report = verify(stripped, watermarkers=MARKERS, settings=settings)
    assert report["verdict"] == "stripped_watermark_found"
    assert not report["manifest"]["present"] and report["manifest"]["recipe"] is None
    assert report["watermark"]["payload"] == PAYLOAD.hex()
    assert report["watermark"]["matches_manifest"] is None  # nothing to compare with


def test_plain_video_is_neither(tmp_path, settings):
    report = verify(make_video(tmp_path / "camera.mp4"), watermarkers=MARKERS, settings=settings)
    assert report["verdict"] == "neither"
    assert not report["manifest"]["present"] and not report["watermark"]["detected"]
    assert report["watermark"]["confidence"] < 0.5


def test_without_watermarkers_only_the_manifest_decides(tmp_path, settings):
    signed = sign(tmp_path, settings, watermarked_frames(), "ai.mp4")
    report = verify(signed, watermarkers=[], settings=settings)
    assert report["verdict"] == "signed_no_watermark"
    assert report["watermark"] == {"detected": False, "payload": None, "confidence": 0.0, "watermarker": None,
                                   "checked": [], "matches_manifest": None}


def test_unreadable_file_is_an_error_naming_it(tmp_path, settings):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40)
    with pytest.raises((ProvenanceError, VideoIOError), match="broken.mp4"):
        verify(tmp_path / "broken.mp4", watermarkers=MARKERS, settings=settings)
    with pytest.raises(ProvenanceError, match="missing.mp4"):
        verify(tmp_path / "missing.mp4", watermarkers=MARKERS, settings=settings)


def test_format_report_states_the_verdict_and_the_evidence(tmp_path, settings, monkeypatch):
    intact = verify(sign(tmp_path, settings, watermarked_frames(), "ai.mp4"), watermarkers=MARKERS, settings=settings)
    text = format_report(intact)
    assert text.splitlines()[0] == f"{tmp_path / 'ai.mp4'}: AI-generated: signed C2PA manifest intact, watermark found"
    assert "valid, trusted signer" in text and "seed 1234" in text and PAYLOAD.hex() in text
    assert "matches the manifest" in text

    flip_byte_in_box(tmp_path / "ai.mp4", "mdat")
    tampered = format_report(verify(tmp_path / "ai.mp4", watermarkers=MARKERS, settings=settings))
    assert "TAMPERED" in tampered and "INVALID" in tampered and "error: assertion.bmffHash.mismatch" in tampered

    camera = tmp_path / "camera-signed.mp4"  # a valid manifest that does not say "made by a model"
    definition = manifest_definition({})
    definition["assertions"][0]["data"]["actions"][0]["digitalSourceType"] = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"
    monkeypatch.setattr(provenance, "manifest_definition", lambda recipe, title=None: definition)
    sign_file(make_video(tmp_path / "capture.mp4"), camera, {}, settings=settings)
    captured = verify(camera, watermarkers=MARKERS, settings=settings)
    assert captured["verdict"] == "signed_no_watermark" and not captured["manifest"]["ai_generated"]
    assert format_report(captured).startswith(f"{camera}: not declared AI-generated: signed C2PA manifest intact")

    plain = format_report(verify(make_video(tmp_path / "camera.mp4"), watermarkers=[], settings=settings))
    assert "manifest: none" in plain and "no watermarker installed" in plain
    assert set(VERDICTS) == {"signed_intact", "signed_no_watermark", "tampered", "stripped_watermark_found", "neither"}


def test_someone_elses_signature_is_reported_untrusted(tmp_path, settings):
    signed = sign(tmp_path, settings, watermarked_frames(), "ai.mp4")
    stranger = ProvenanceSettings(config_dir=tmp_path / "stranger")
    report = verify(signed, watermarkers=MARKERS, settings=stranger)
    assert report["verdict"] == "signed_intact"
    assert report["manifest"]["valid"] and not report["manifest"]["trusted"]
    assert "signer not in your trust anchors" in format_report(report)


def test_with_the_spreadspectrum_watermarker_from_the_registry(tmp_path, settings):
    """The real watermarker, found the way `skyloom verify` finds it: through the plugin registry."""
    from skyloom.registry import DEFAULT_PLUGINS, Registry

    builtins = DEFAULT_PLUGINS
    marker = Registry.load(builtins=builtins, entry_points=False, strict=True).create("watermarker", "spreadspectrum")
    t = torch.arange(8).view(8, 1, 1, 1)
    y, x = torch.arange(128).view(1, 128, 1, 1), torch.arange(128).view(1, 1, 128, 1)
    frames = (60 + x + y // 2 + 3 * t).to(torch.uint8).expand(8, 128, 128, 3).contiguous()  # smooth moving ramps
    payload = bytes.fromhex("0123456789abcdef")
    signed = sign(tmp_path, settings, marker.embed(frames, payload), "ai.mp4")
    markers = [("spreadspectrum", marker)]

    report = verify(signed, watermarkers=markers, settings=settings)
    assert report["verdict"] == "signed_intact" and report["watermark"]["payload"] == payload.hex()

    stripped = verify(reencode(signed, tmp_path / "reupload.mp4"), watermarkers=markers, settings=settings)
    assert stripped["verdict"] == "stripped_watermark_found" and stripped["watermark"]["payload"] == payload.hex()


def test_copy_in_a_container_without_c2pa_support_still_gets_its_watermark_checked(tmp_path, settings):
    """Platforms often re-encode to WebM or MKV, which cannot carry a C2PA manifest at all."""
    frames, _ = read_video(sign(tmp_path, settings, watermarked_frames(), "ai.mp4"))
    copy = make_video(tmp_path / "copy.mkv", frames)
    report = verify(copy, watermarkers=MARKERS, settings=settings)
    assert report["verdict"] == "stripped_watermark_found"
    assert not report["manifest"]["present"] and report["manifest"]["warnings"]
    (tmp_path / "junk.mkv").write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 64)
    with pytest.raises(VideoIOError, match="junk.mkv"):
        verify(tmp_path / "junk.mkv", watermarkers=MARKERS, settings=settings)
