"""C2PA provenance: what skyloom signs into every video, and what a reader can tell from it."""

import datetime
import json
import stat
import struct
from pathlib import Path

import av
import c2pa
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyloom import __version__
from skyloom.provenance import (
    C2PA_BMFF_UUID,
    DEV_CA_CERT,
    DEV_SIGNER_CHAIN,
    DEV_SIGNER_KEY,
    RECIPE_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    ProvenanceError,
    ProvenanceSettings,
    read_manifest,
    recipe_from_record,
    sign_file,
)
from skyloom.video_io import write_image, write_video

PROMPT = "a red fox running through fresh snow at dawn"


# --- fixtures and helpers (test_verify.py uses them too) ----------------------------------


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Never read the user's keys or write into their ~/.config."""
    for name in ("SKYLOOM_C2PA_KEY", "SKYLOOM_C2PA_CERTS", "SKYLOOM_C2PA_TRUST_ANCHORS", "SKYLOOM_C2PA_INCLUDE_PROMPT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SKYLOOM_CONFIG_DIR", str(tmp_path / "env-config"))


@pytest.fixture
def settings(tmp_path) -> ProvenanceSettings:
    return ProvenanceSettings(config_dir=tmp_path / "config")


def flat_video(frames: int = 8, size: int = 64) -> torch.Tensor:
    """(T, H, W, 3) uint8: flat grey frames that brighten over time (watermarks read cleanly on them)."""
    levels = torch.linspace(90, 130, frames).round().to(torch.uint8)
    return levels.view(frames, 1, 1, 1).expand(frames, size, size, 3).contiguous()


def make_video(path: Path, frames: torch.Tensor | None = None, fps: float = 8) -> Path:
    write_video(path, flat_video() if frames is None else frames, fps, preset="ultrafast")
    return path


def pipeline_record(prompt: str = PROMPT) -> dict:
    """A result record shaped like Pipeline._base_record after a run (pipeline.py)."""
    plugin = lambda name, version="0.1.0": {"name": name, "package": "skyloom", "version": version}  # noqa: E731
    return {
        "skyloom_version": __version__,
        "prompt": prompt,
        "negative_prompt": "blurry, low quality",
        "enhanced_prompt": prompt + ", cinematic lighting",
        "seed": 1234,
        "frames": 8,
        "width": 64,
        "height": 64,
        "fps": 8,
        "steps": 4,
        "guidance": 5.5,
        "guidance_interval": [0.3, 1.0],
        "model": {"name": "skyloom-tiny", "path": "/home/someone/models/tiny", "hash": "ab12" * 16, "trained": False},
        "device": "cpu",
        "plugins": {
            "text_encoder": [plugin("minilm")],
            "video_autoencoder": [plugin("causal3d")],
            "safety_filter": [plugin("policy")],
            "watermarker": [plugin("spreadspectrum")],
            "prompt_enhancer": [],
            "captioner": [],
            "sampler": [plugin("euler")],
        },
        "sampler": {"name": "euler", "config": {"num_train_timesteps": 1000}, "shift": 1.73},
        "safety": [{"allowed": True, "filter": "policy", "stage": "prompt"}],
        "watermarks": [{"watermarker": "spreadspectrum", "payload": "ab12ab12deadbeef"}],
        "stages": {"sampling": {"status": "ran", "seconds": 1.2, "peak_rss_bytes": 1}},
    }


def top_level_boxes(data: bytes):
    """(type, offset, size) of each top-level MP4 box."""
    offset = 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:
            size = len(data) - offset
        yield kind.decode("latin-1"), offset, size
        offset += size


def flip_byte_in_box(path: Path, box: str, where: float = 0.5) -> None:
    """Invert one byte `where` of the way through the first `box` (e.g. the video data, "mdat")."""
    data = bytearray(path.read_bytes())
    _, offset, size = next(b for b in top_level_boxes(data) if b[0] == box)
    data[offset + 16 + int((size - 16) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def reencode(source: Path, dest: Path) -> Path:
    """Decode and encode again with PyAV, as any editor or re-upload would."""
    with av.open(str(source)) as inp, av.open(str(dest), "w") as out:
        source_stream = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = source_stream.width, source_stream.height, "yuv420p"
        stream.options = {"crf": "12"}
        for frame in inp.decode(video=0):
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    return dest


def signed_video(tmp_path: Path, settings: ProvenanceSettings, *, include_prompt: bool = False, name: str = "signed.mp4") -> Path:
    source = make_video(tmp_path / f"unsigned-{name}")
    dest = tmp_path / name
    sign_file(source, dest, recipe_from_record(pipeline_record(), include_prompt=include_prompt), settings=settings)
    return dest


def make_ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Studio"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


KEY_TYPES = {
    "es256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "es384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ps256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate(),
}


def issue_signer(ca_key, ca_cert, common_name: str, *, eku: bool = True, key_type: str = "es256"):
    key = KEY_TYPES[key_type]()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Studio"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_custom_credentials(directory: Path, *, eku: bool = True, key_type: str = "es256"):
    """A CA and a signer issued by it, as files: (key path, chain path, CA path)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("Example Studio Root")
    key, cert = issue_signer(ca_key, ca_cert, "Example Studio Signer", eku=eku, key_type=key_type)
    (directory / "key.pem").write_bytes(key_pem(key))
    (directory / "chain.pem").write_bytes(pem(cert, ca_cert))
    (directory / "ca.pem").write_bytes(pem(ca_cert))
    return directory / "key.pem", directory / "chain.pem", directory / "ca.pem"


# --- signing and reading back --------------------------------------------------------------


def test_signed_video_reads_back_valid_and_trusted_with_the_recipe(tmp_path, settings):
    recipe = recipe_from_record(pipeline_record(), include_prompt=False)
    source = make_video(tmp_path / "unsigned.mp4")
    sign_file(source, tmp_path / "signed.mp4", recipe, settings=settings)

    report = read_manifest(tmp_path / "signed.mp4", settings=settings)
    assert report.present and report.valid and report.trusted  # default anchors: this user's dev CA
    assert report.errors == [] and report.warnings == []
    assert report.recipe == recipe
    assert report.claim_generator == f"skyloom/{__version__}"
    assert report.ai_generated and report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.active_manifest.startswith("urn:c2pa:")


def test_manifest_declares_creation_by_a_trained_model(tmp_path, settings):
    """Checked with c2pa's own reader, independently of read_manifest's parsing."""
    signed = signed_video(tmp_path, settings)
    with open(signed, "rb") as stream, c2pa.Reader("video/mp4", stream) as reader:
        manifest = reader.get_active_manifest()
    assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
    actions = assertions["c2pa.actions.v2"]["actions"]
    created = [a for a in actions if a["action"] == "c2pa.created"]
    assert len(created) == 1
    assert created[0]["digitalSourceType"] == "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
    assert manifest["claim_generator_info"][0]["name"] == "skyloom"
    assert manifest["claim_generator_info"][0]["version"] == __version__
    assert assertions[RECIPE_LABEL]["seed"] == 1234


def test_signed_video_still_decodes_to_the_same_frames(tmp_path, settings):
    from skyloom.video_io import read_video

    signed = signed_video(tmp_path, settings)
    before, fps_before = read_video(tmp_path / "unsigned-signed.mp4")
    after, fps_after = read_video(signed)
    assert torch.equal(before, after) and fps_before == fps_after


def test_prompt_is_left_out_unless_the_user_opts_in(tmp_path, settings):
    private = read_manifest(signed_video(tmp_path, settings, name="private.mp4"), settings=settings).recipe
    for key in ("prompt", "negative_prompt", "enhanced_prompt"):
        assert key not in private
    assert PROMPT.encode() not in (tmp_path / "private.mp4").read_bytes()

    public = read_manifest(signed_video(tmp_path, settings, include_prompt=True, name="public.mp4"), settings=settings).recipe
    assert PROMPT.encode() in (tmp_path / "public.mp4").read_bytes()  # so the check above can fail
    assert public["prompt"] == PROMPT
    assert public["negative_prompt"] == "blurry, low quality"
    assert {k: v for k, v in public.items() if k not in ("prompt", "negative_prompt", "enhanced_prompt")} == private


def test_recipe_keeps_what_identifies_the_generation_and_drops_local_details():
    recipe = recipe_from_record(pipeline_record(), include_prompt=False)
    assert recipe["model"] == {"name": "skyloom-tiny", "hash": "ab12" * 16, "trained": False}
    assert recipe["sampler"] == {"name": "euler", "config": {"num_train_timesteps": 1000}, "shift": 1.73}
    assert (recipe["seed"], recipe["steps"], recipe["guidance"]) == (1234, 4, 5.5)
    assert (recipe["width"], recipe["height"], recipe["frames"], recipe["fps"]) == (64, 64, 8, 8)
    assert recipe["plugins"]["sampler"] == [{"name": "euler", "package": "skyloom", "version": "0.1.0"}]
    assert recipe["watermarks"] == [{"watermarker": "spreadspectrum", "payload": "ab12ab12deadbeef"}]
    assert "/home/someone" not in json.dumps(recipe)
    for private in ("device", "stages", "safety"):
        assert private not in recipe


def test_recipe_from_an_incomplete_record_says_what_is_missing():
    record = pipeline_record()
    del record["seed"], record["sampler"]
    with pytest.raises(ProvenanceError, match="lacks sampler, seed"):
        recipe_from_record(record, include_prompt=False)


def test_png_frames_are_signed_too(tmp_path, settings):
    write_image(tmp_path / "still.png", flat_video(1)[0])
    sign_file(tmp_path / "still.png", tmp_path / "signed.png", {"seed": 7}, settings=settings)
    report = read_manifest(tmp_path / "signed.png", settings=settings)
    assert report.valid and report.recipe == {"seed": 7}


# --- tampering and stripping ---------------------------------------------------------------


def test_changing_the_video_data_invalidates_the_manifest(tmp_path, settings):
    signed = signed_video(tmp_path, settings)
    flip_byte_in_box(signed, "mdat")
    report = read_manifest(signed, settings=settings)
    assert report.present and not report.valid and not report.trusted
    assert any("bmffHash.mismatch" in error for error in report.errors)


def test_altering_the_manifest_invalidates_it(tmp_path, settings):
    signed = signed_video(tmp_path, settings)
    data = signed.read_bytes()
    assert any(kind == "uuid" and data[offset + 8 : offset + 24] == C2PA_BMFF_UUID
               for kind, offset, _ in top_level_boxes(data))
    flip_byte_in_box(signed, "uuid", where=0.6)
    report = read_manifest(signed, settings=settings)
    assert report.present and not report.valid and report.errors


def test_reencoding_strips_the_manifest(tmp_path, settings):
    stripped = reencode(signed_video(tmp_path, settings), tmp_path / "reencoded.mp4")
    report = read_manifest(stripped, settings=settings)
    assert not report.present and not report.valid and report.recipe is None


def test_unsigned_video_has_no_manifest(tmp_path, settings):
    report = read_manifest(make_video(tmp_path / "plain.mp4"), settings=settings)
    assert (report.present, report.valid, report.trusted, report.recipe) == (False, False, False, None)


# --- writing: atomic, source untouched -------------------------------------------------------


def test_sign_file_leaves_the_source_alone_and_no_temporary_files(tmp_path, settings):
    source = make_video(tmp_path / "unsigned.mp4")
    original = source.read_bytes()
    sign_file(source, tmp_path / "signed.mp4", {"seed": 1}, settings=settings)
    assert source.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", "signed.mp4", "unsigned.mp4"]


def test_failed_signing_leaves_dest_as_it_was(tmp_path, monkeypatch):
    source = make_video(tmp_path / "unsigned.mp4")
    dest = tmp_path / "signed.mp4"
    dest.write_bytes(b"previous contents")
    bad = ProvenanceSettings(config_dir=tmp_path / "config", key_path=tmp_path / "missing.pem", cert_chain_path=tmp_path / "chain.pem")
    with pytest.raises(ProvenanceError):
        sign_file(source, dest, {"seed": 1}, settings=bad)

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(c2pa.Builder, "sign", interrupted)
    with pytest.raises(KeyboardInterrupt):  # interrupted inside c2pa, after the temporary file exists
        sign_file(source, dest, {"seed": 1}, settings=ProvenanceSettings(config_dir=tmp_path / "config"))
    assert dest.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", "signed.mp4", "unsigned.mp4"]


def test_write_signed_media_writes_a_signed_file_and_nothing_else(tmp_path, settings):
    from skyloom.provenance import write_signed_media

    frames = flat_video()
    # A loop's record, whose lists of frames c2pa-rs would read back mangled as arrays of numbers.
    record = {**pipeline_record(), "loop": {"rolled_by": 4, "kept_frames": [0, 5, 6, 7, 8], "generated_frames": [1, 2, 3, 4],
                                            "conditioning_moved_to": [5]}}
    out = write_signed_media(tmp_path / "clip.mp4", frames, 8, record, settings=settings, preset="ultrafast")
    assert out == tmp_path / "clip.mp4"
    report = read_manifest(out, settings=settings)
    assert report.valid and report.recipe == recipe_from_record(record, include_prompt=False)
    assert report.recipe["guidance_interval"] == {"low": 0.3, "high": 1.0}
    runs = lambda *pairs: [{"first": a, "last": b} for a, b in pairs]  # noqa: E731
    assert report.recipe["loop"] == {"rolled_by": 4, "kept_frames": runs((0, 0), (5, 8)), "generated_frames": runs((1, 4)),
                                     "conditioning_moved_to": [{"start_frame": 5}]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "config"]

    opted_in = ProvenanceSettings(config_dir=settings.config_dir, include_prompt=True)
    write_signed_media(tmp_path / "still.png", frames[:1], 8, pipeline_record(), settings=opted_in)
    assert read_manifest(tmp_path / "still.png", settings=settings).recipe["prompt"] == PROMPT

    broken = ProvenanceSettings(config_dir=settings.config_dir, key_path=tmp_path / "none.pem", cert_chain_path=tmp_path / "none.pem")
    with pytest.raises(ProvenanceError):
        write_signed_media(tmp_path / "clip.mp4", frames, 8, pipeline_record(), settings=broken)
    assert read_manifest(tmp_path / "clip.mp4", settings=settings).valid  # the earlier file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "config", "still.png"]


# --- the development CA --------------------------------------------------------------------


def test_dev_ca_is_created_once_and_reused(tmp_path, settings):
    signed_video(tmp_path, settings, name="first.mp4")
    directory = settings.config_dir / "c2pa"
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert {DEV_CA_CERT, DEV_SIGNER_CHAIN, DEV_SIGNER_KEY} <= set(files)
    signed_video(tmp_path, settings, name="second.mp4")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
    first = read_manifest(tmp_path / "first.mp4", settings=settings)
    second = read_manifest(tmp_path / "second.mp4", settings=settings)
    assert first.signer == second.signer and first.trusted and second.trusted
    assert [p.name for p in settings.config_dir.iterdir()] == ["c2pa"]  # no staging directories left


def test_two_processes_creating_the_dev_ca_at_once_agree_on_one(tmp_path, monkeypatch):
    """Simulate the race deterministically: another process finishes creating the CA while
    this one is still generating its own. This one must adopt theirs, whole, and clean up."""
    from skyloom import provenance

    config = tmp_path / "config"
    real_create = provenance.create_dev_credentials
    calls = []

    def slow_create():
        ours = real_create()
        if not calls:
            calls.append("other process")
            provenance.ensure_dev_credentials(config)  # the other process wins the rename
        return ours

    monkeypatch.setattr(provenance, "create_dev_credentials", slow_create)
    directory = provenance.ensure_dev_credentials(config)
    assert calls and [p.name for p in config.iterdir()] == ["c2pa"]
    key = serialization.load_pem_private_key((directory / DEV_SIGNER_KEY).read_bytes(), None)
    signer = x509.load_pem_x509_certificates((directory / DEV_SIGNER_CHAIN).read_bytes())[0]
    assert key.public_key() == signer.public_key()  # the key and chain come from the same run


def test_incomplete_dev_directory_is_explained(tmp_path, settings):
    (settings.config_dir / "c2pa").mkdir(parents=True)
    (settings.config_dir / "c2pa" / DEV_CA_CERT).write_text("")
    with pytest.raises(ProvenanceError, match=r"is incomplete \(missing signer-chain.pem, signer-key.pem\); delete it"):
        signed_video(tmp_path, settings)


def test_dev_key_files_are_private(tmp_path, settings):
    signed_video(tmp_path, settings)
    directory = settings.config_dir / "c2pa"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / DEV_SIGNER_KEY).stat().st_mode) == 0o600
    assert "*" in (directory / ".gitignore").read_text().split()
    # Only the signer's key is kept: the CA's was discarded once it had signed.
    assert {p.name for p in directory.iterdir()} == {DEV_CA_CERT, DEV_SIGNER_CHAIN, DEV_SIGNER_KEY, ".gitignore"}


def test_dev_certificates_have_what_c2pa_requires(tmp_path, settings):
    signed_video(tmp_path, settings)
    directory = settings.config_dir / "c2pa"
    (ca,) = x509.load_pem_x509_certificates((directory / DEV_CA_CERT).read_bytes())
    signer, chain_ca = x509.load_pem_x509_certificates((directory / DEV_SIGNER_CHAIN).read_bytes())
    assert chain_ca == ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.subject == ca.issuer
    signer.verify_directly_issued_by(ca)
    assert not signer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert signer.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert isinstance(signer.public_key(), ec.EllipticCurvePublicKey) and signer.public_key().curve.name == "secp256r1"
    assert signer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert signer.not_valid_before_utc < now < signer.not_valid_after_utc <= ca.not_valid_after_utc
    key = serialization.load_pem_private_key((directory / DEV_SIGNER_KEY).read_bytes(), None)
    assert key.public_key() == signer.public_key()


def test_another_users_dev_ca_is_valid_but_untrusted(tmp_path, settings):
    signed = signed_video(tmp_path, settings)
    other = ProvenanceSettings(config_dir=tmp_path / "other-user")
    signed_video(tmp_path, other, name="theirs.mp4")  # they have a dev CA of their own
    report = read_manifest(signed, settings=other)
    assert report.valid and not report.trusted
    assert any("untrusted" in warning for warning in report.warnings) and report.errors == []

    # Trusting someone's CA is explicit: name it as a trust anchor.
    anchors = ProvenanceSettings(config_dir=other.config_dir, trust_anchors_path=settings.dev_dir / DEV_CA_CERT)
    assert read_manifest(signed, settings=anchors).trusted


def test_an_empty_trust_anchors_file_trusts_nothing(tmp_path, settings):
    signed = signed_video(tmp_path, settings)
    (tmp_path / "none.pem").write_text("")
    report = read_manifest(signed, settings=ProvenanceSettings(config_dir=settings.config_dir, trust_anchors_path=tmp_path / "none.pem"))
    assert report.valid and not report.trusted
    missing = ProvenanceSettings(config_dir=settings.config_dir, trust_anchors_path=tmp_path / "gone.pem")
    with pytest.raises(ProvenanceError, match=r"trust anchors file '.*gone\.pem' does not exist.*SKYLOOM_C2PA_TRUST_ANCHORS"):
        read_manifest(signed, settings=missing)


# --- configured keys ----------------------------------------------------------------------


@pytest.mark.parametrize("key_type", sorted(KEY_TYPES))
def test_custom_key_and_certificate_chain(tmp_path, key_type):
    key, chain, ca = write_custom_credentials(tmp_path / "studio", key_type=key_type)
    config = tmp_path / "config"
    custom = ProvenanceSettings(config_dir=config, key_path=key, cert_chain_path=chain, trust_anchors_path=ca)
    signed = signed_video(tmp_path, custom)
    report = read_manifest(signed, settings=custom)
    assert report.valid and report.trusted
    assert report.signer == {"organization": "Example Studio", "common_name": "Example Studio Signer", "alg": key_type.capitalize()}
    assert not (config / "c2pa").exists()  # no development CA when keys are configured
    assert not read_manifest(signed, settings=ProvenanceSettings(config_dir=config)).trusted


def test_from_env_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYLOOM_C2PA_KEY", str(tmp_path / "k.pem"))
    monkeypatch.setenv("SKYLOOM_C2PA_CERTS", str(tmp_path / "c.pem"))
    monkeypatch.setenv("SKYLOOM_C2PA_TRUST_ANCHORS", str(tmp_path / "t.pem"))
    monkeypatch.setenv("SKYLOOM_CONFIG_DIR", str(tmp_path / "cfg"))
    s = ProvenanceSettings.from_env()
    assert (s.key_path, s.cert_chain_path, s.trust_anchors_path, s.config_dir, s.include_prompt) == (
        tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "t.pem", tmp_path / "cfg", False)
    monkeypatch.setenv("SKYLOOM_C2PA_INCLUDE_PROMPT", "1")
    assert ProvenanceSettings.from_env().include_prompt
    assert not ProvenanceSettings.from_env(include_prompt=False).include_prompt


def test_default_config_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("SKYLOOM_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert ProvenanceSettings.from_env().config_dir == tmp_path / "xdg" / "skyloom"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ProvenanceSettings().config_dir == tmp_path / "home" / ".config" / "skyloom"


# --- errors a person can act on ----------------------------------------------------------------


def test_missing_key_file_is_named_with_what_to_do(tmp_path):
    source = make_video(tmp_path / "unsigned.mp4")
    _, chain, _ = write_custom_credentials(tmp_path / "studio")
    s = ProvenanceSettings(config_dir=tmp_path / "config", key_path=tmp_path / "nokey.pem", cert_chain_path=chain)
    with pytest.raises(ProvenanceError, match=r"signing key '.*nokey\.pem' does not exist.*SKYLOOM_C2PA_KEY"):
        sign_file(source, tmp_path / "signed.mp4", {}, settings=s)


def test_key_without_certificate_chain_is_an_error(tmp_path):
    key, _, _ = write_custom_credentials(tmp_path / "studio")
    s = ProvenanceSettings(config_dir=tmp_path / "config", key_path=key)
    with pytest.raises(ProvenanceError, match="SKYLOOM_C2PA_KEY is set but SKYLOOM_C2PA_CERTS is not"):
        sign_file(make_video(tmp_path / "unsigned.mp4"), tmp_path / "signed.mp4", {}, settings=s)


def test_certificate_that_does_not_match_the_key(tmp_path):
    _, chain, _ = write_custom_credentials(tmp_path / "a")
    other_key, _, _ = write_custom_credentials(tmp_path / "b")
    s = ProvenanceSettings(config_dir=tmp_path / "config", key_path=other_key, cert_chain_path=chain)
    with pytest.raises(ProvenanceError, match=r"chain '.*a/chain\.pem' does not match the signing key '.*b/key\.pem'"):
        sign_file(make_video(tmp_path / "unsigned.mp4"), tmp_path / "signed.mp4", {}, settings=s)


def test_encrypted_or_garbage_key_is_explained(tmp_path):
    key, chain, _ = write_custom_credentials(tmp_path / "studio")
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    key.write_bytes(loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    s = ProvenanceSettings(config_dir=tmp_path / "config", key_path=key, cert_chain_path=chain)
    source = make_video(tmp_path / "unsigned.mp4")
    with pytest.raises(ProvenanceError, match="is encrypted"):
        sign_file(source, tmp_path / "signed.mp4", {}, settings=s)
    key.write_text("not a key")
    with pytest.raises(ProvenanceError, match="is not a PEM private key"):
        sign_file(source, tmp_path / "signed.mp4", {}, settings=s)


def test_certificate_c2pa_would_reject_is_explained(tmp_path):
    key, chain, _ = write_custom_credentials(tmp_path / "studio", eku=False)
    s = ProvenanceSettings(config_dir=tmp_path / "config", key_path=key, cert_chain_path=chain)
    with pytest.raises(ProvenanceError, match=r"chain\.pem' .*Example Studio Signer.* its extendedKeyUsage lacks emailProtection"):
        sign_file(make_video(tmp_path / "unsigned.mp4"), tmp_path / "signed.mp4", {}, settings=s)


def test_certificate_problems_match_what_c2pa_rejects(tmp_path):
    """The local checks agree with c2pa: a certificate they pass signs, one they fail does not."""
    from skyloom.provenance import certificate_problems, manifest_definition

    ca_key, ca_cert = make_ca("Root")
    good_key, good = issue_signer(ca_key, ca_cert, "Good")
    no_eku_key, no_eku = issue_signer(ca_key, ca_cert, "No EKU", eku=False)
    assert certificate_problems(good) == []
    assert certificate_problems(no_eku) == ["its extendedKeyUsage lacks emailProtection (1.3.6.1.5.5.7.3.4)"]
    assert "it is a CA certificate (basicConstraints CA:true)" in certificate_problems(ca_cert)
    source = make_video(tmp_path / "unsigned.mp4")
    for key, cert, signs in ((good_key, good, True), (no_eku_key, no_eku, False)):
        info = c2pa.C2paSignerInfo("es256", pem(cert, ca_cert), key_pem(key), None)
        with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest_definition({})) as builder:
            with open(source, "rb") as src, open(tmp_path / "out.mp4", "w+b") as dst:
                if signs:
                    builder.sign(signer, "video/mp4", src, dst)
                else:
                    with pytest.raises(c2pa.C2paError, match="certificate"):
                        builder.sign(signer, "video/mp4", src, dst)


def test_unreadable_files_are_named(tmp_path, settings):
    with pytest.raises(ProvenanceError, match=r"cannot read file '.*nothere\.mp4': no such file"):
        read_manifest(tmp_path / "nothere.mp4", settings=settings)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ProvenanceError, match=r"'.*empty\.mp4': the file is empty"):
        read_manifest(tmp_path / "empty.mp4", settings=settings)
    (tmp_path / "notes.mp4").write_bytes(b"these are not the frames you are looking for" * 20)
    with pytest.raises(ProvenanceError, match=r"'.*notes\.mp4': it is not an MP4, MOV, PNG or JPEG file"):
        read_manifest(tmp_path / "notes.mp4", settings=settings)
    with pytest.raises(ProvenanceError, match=r"cannot sign '.*notes\.mp4': it is not an MP4, MOV or PNG file"):
        sign_file(tmp_path / "notes.mp4", tmp_path / "signed.mp4", {}, settings=settings)


def test_recipe_must_be_plain_json(tmp_path, settings):
    with pytest.raises(ProvenanceError, match="not plain JSON"):
        sign_file(make_video(tmp_path / "unsigned.mp4"), tmp_path / "signed.mp4", {"seed": object()}, settings=settings)
