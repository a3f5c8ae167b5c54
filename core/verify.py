"""Is this video AI-made, and has it changed since? Checks a file's C2PA manifest and its watermark.

The two marks fail differently. The manifest (skyloom.provenance) is exact and attributable
but fragile: any re-encode or screen capture removes it, and any change to the video makes it
invalid. The watermark is in the pixels and survives re-encoding, but says only "a skyloom
model made this" and a payload. Together:

    verdict                    manifest          watermark   meaning
    signed_intact              valid             found       as generated, both marks intact
    signed_no_watermark        valid             not found   as generated, but no watermark (none embedded,
                                                             or a watermarker this check was not given)
    tampered                   present, invalid  either      changed after signing, or the manifest was altered
    stripped_watermark_found   absent            found       AI-made, re-encoded or stripped of its manifest
    neither                    absent            not found   no evidence either way (not proof of a camera)
"""

from __future__ import annotations

from pathlib import Path

from skyloom.kinds import Watermarker
from skyloom.provenance import ManifestReport, ProvenanceError, ProvenanceSettings, read_manifest, sniff_format

VERDICTS = ("signed_intact", "signed_no_watermark", "tampered", "stripped_watermark_found", "neither")


def _detect_watermark(frames, watermarkers: list[tuple[str, Watermarker]]) -> dict:
    """Run every watermarker; report the most confident detection, else the best miss."""
    checked, best, too_small = [], None, []
    for name, marker in watermarkers:
        try:
            detection = marker.detect(frames)
        except ValueError:  # frames below what this watermarker can read: it cannot be there
            too_small.append(name)
            continue
        checked.append(name)
        key = (bool(detection.detected), float(detection.confidence))
        if best is None or key > best[0]:
            best = (key, name, detection)
    result = {"detected": False, "payload": None, "confidence": 0.0, "watermarker": None, "checked": checked}
    if too_small:
        result["too_small_for"] = too_small
    if best is not None:
        (detected, confidence), name, detection = best
        result["confidence"] = round(confidence, 4)
        if detected:
            payload = detection.payload
            result.update(detected=True, watermarker=name, payload=payload.hex() if payload is not None else None)
    return result


def _verdict(manifest: ManifestReport, watermark_found: bool) -> str:
    if manifest.present and not manifest.valid:
        return "tampered"
    if manifest.present:
        return "signed_intact" if watermark_found else "signed_no_watermark"
    return "stripped_watermark_found" if watermark_found else "neither"


def verify(
    path: Path,
    *,
    watermarkers: list[tuple[str, Watermarker]],
    settings: ProvenanceSettings | None = None,
) -> dict:
    """Check a video's C2PA manifest and look for watermarks; returns a JSON-serialisable report.

    watermarkers: (name, watermarker) pairs to run, e.g. every registered watermarker.
    settings: trust anchors and config directory (default: ProvenanceSettings.from_env()).

    Returns {"file", "manifest": {"present", "valid", "trusted", "recipe", "errors", ...},
    "watermark": {"detected", "payload" (hex or None), "confidence", "watermarker", ...},
    "verdict"}: one of VERDICTS (see the module docstring). A file that can be neither
    decoded nor parsed for a manifest raises ProvenanceError or VideoIOError naming it.
    """
    from skyloom.video_io import VideoIOError, read_video

    path = Path(path)
    try:
        manifest = read_manifest(path, settings=settings)
    except ProvenanceError as error:
        # A container C2PA has no binding for (WebM, MKV, ...) cannot carry a manifest: a
        # re-encoded copy often arrives as one, and its watermark is still worth checking.
        if not path.is_file() or sniff_format(path) is not None:
            raise
        manifest = ManifestReport(present=False, valid=False, trusted=False, recipe=None,
                                  warnings=[f"no C2PA manifest can be read from this format: {error}"])
    try:
        frames, _ = read_video(path)
    except VideoIOError as error:
        if not manifest.present:
            raise
        # Tampering can break decoding too; the manifest already says what happened.
        watermark = {"detected": False, "payload": None, "confidence": 0.0, "watermarker": None,
                     "checked": [], "error": str(error)}
    else:
        watermark = _detect_watermark(frames, watermarkers)

    # Does the watermark carry the payload the manifest says was embedded?
    recipe = manifest.recipe if isinstance(manifest.recipe, dict) else {}
    recorded = {w.get("payload") for w in recipe.get("watermarks") or [] if isinstance(w, dict)}
    watermark["matches_manifest"] = (watermark["payload"] in recorded) if watermark["detected"] and recorded else None

    return {
        "file": str(path),
        "manifest": manifest.as_dict(),
        "watermark": watermark,
        "verdict": _verdict(manifest, watermark["detected"]),
    }


_VERDICT_LINES = {
    "signed_intact": "signed C2PA manifest intact, watermark found",
    "signed_no_watermark": "signed C2PA manifest intact, no watermark found",
    "tampered": "TAMPERED: the C2PA manifest does not match the file (changed after signing)",
    "stripped_watermark_found": "AI-generated: watermark found, but no C2PA manifest (re-encoded or stripped)",
    "neither": "no C2PA manifest and no watermark found (this does not prove the video is not AI-made)",
}


def format_report(report: dict) -> str:
    """The report of verify() as a few lines a person can read (the `skyloom verify` output)."""
    manifest, watermark = report["manifest"], report["watermark"]
    verdict = _VERDICT_LINES[report["verdict"]]
    if report["verdict"].startswith("signed_"):
        # Only what the manifest declares: a camera's valid manifest is signed, not AI-made.
        verdict = ("AI-generated: " if manifest.get("ai_generated") else "not declared AI-generated: ") + verdict
    lines = [f"{report['file']}: {verdict}"]
    if manifest["present"]:
        trust = "trusted signer" if manifest["trusted"] else "signer not in your trust anchors"
        state = f"valid, {trust}" if manifest["valid"] else "INVALID"
        signer = manifest.get("signer") or {}
        who = signer.get("common_name") or signer.get("organization")
        lines.append(f"  manifest: {state}" + (f"; signed by {who}" if who else "")
                     + (f"; made with {manifest['claim_generator']}" if manifest.get("claim_generator") else ""))
        for error in manifest["errors"]:
            lines.append(f"    error: {error}")
        recipe = manifest.get("recipe")
        if recipe:
            model = recipe.get("model") or {}
            sampler = recipe.get("sampler") or {}
            label = "recipe" if manifest["valid"] else "recipe (as the invalid manifest claims)"
            interval = recipe.get("guidance_interval")
            every_step = not isinstance(interval, dict) or (interval.get("low"), interval.get("high")) == (0.0, 1.0)
            where = "" if every_step or recipe.get("guidance") == 1 else f" for t in [{interval.get('low')}, {interval.get('high')}]"
            lines.append(
                f"  {label}: model {model.get('name')} ({str(model.get('hash'))[:12]}), "
                f"sampler {sampler.get('name') if isinstance(sampler, dict) else sampler}, seed {recipe.get('seed')}, "
                f"{recipe.get('steps')} steps, guidance {recipe.get('guidance')}{where}, "
                f"{recipe.get('width')}x{recipe.get('height')}, {recipe.get('frames')} frames at {recipe.get('fps')} fps"
            )
            if "prompt" in recipe:
                lines.append(f"  prompt: {recipe['prompt']!r}")
    else:
        lines.append("  manifest: none")
    if watermark["detected"]:
        match = {True: ", matches the manifest", False: ", does NOT match the manifest"}.get(watermark.get("matches_manifest"), "")
        lines.append(f"  watermark: {watermark['watermarker']} payload {watermark['payload']} "
                     f"(confidence {watermark['confidence']:.2f}{match})")
    elif watermark.get("error"):
        lines.append(f"  watermark: not checked, the video could not be decoded ({watermark['error']})")
    elif not watermark.get("checked"):
        lines.append("  watermark: not checked (no watermarker installed)")
    else:
        lines.append(f"  watermark: none found by {', '.join(watermark['checked'])}")
    return "\n".join(lines)
