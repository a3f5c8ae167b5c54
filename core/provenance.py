"""C2PA provenance: every video skyloom writes says, in a signed manifest, that an AI made it, and how.

The manifest (C2PA 2.x, signed with c2pa-python) carries:
- a `c2pa.actions.v2` assertion with one `c2pa.created` action whose digitalSourceType is
  trainedAlgorithmicMedia: the IPTC term for "made by a generative model";
- an `org.skyloom.recipe` assertion with the generation recipe (`recipe_from_record`): model
  hash, sampler and its settings, seed, steps, guidance and its interval, size, frames, fps, plugin names and
  versions, watermark payloads; the prompt only when the user opts in (`include_prompt`);
- claim generator skyloom/<version>, and a hard binding (the BMFF hash) of every byte of the
  video, so changing one pixel of one frame makes the manifest invalid.

Signing is fully offline: no timestamp authority, no OCSP, no remote manifests.

Keys. `ProvenanceSettings.key_path` / `cert_chain_path` (SKYLOOM_C2PA_KEY, SKYLOOM_C2PA_CERTS)
name a PEM private key and a PEM certificate chain (signing certificate first). Without them,
the first signature creates a local development CA and a signing certificate in
<config_dir>/c2pa (`ensure_dev_credentials`): an ES256 (P-256) root with CA:true and keyCertSign,
and an end-entity certificate with digitalSignature, extendedKeyUsage emailProtection and
documentSigning (c2pa-rs 0.91 rejects documentSigning alone), CA:false, valid five years. The
CA's private key is discarded once it has signed: nobody can issue more certificates under it.

Trust. A valid manifest is intact and correctly signed; a trusted one is also signed by a
certificate that chains to a trust anchor. The anchors are the PEM file named by
`trust_anchors_path` (SKYLOOM_C2PA_TRUST_ANCHORS) when set, and otherwise this user's own
development CA, so that a user's own videos read as trusted on their own machine. A video
signed by anyone else's development CA is valid but untrusted. To trust nothing, point
SKYLOOM_C2PA_TRUST_ANCHORS at an empty file.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECIPE_LABEL = "org.skyloom.recipe"
ACTIONS_LABEL = "c2pa.actions.v2"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
C2PA_BMFF_UUID = bytes.fromhex("d8fec3d61b0e483c92975828877ec481")  # the uuid box holding a manifest store

DEV_DIR_NAME = "c2pa"
DEV_CA_CERT = "dev-ca.pem"
DEV_SIGNER_CHAIN = "signer-chain.pem"
DEV_SIGNER_KEY = "signer-key.pem"

# Validation codes that say who signed, not whether the file is intact: warnings, not errors.
TRUST_CODES = frozenset({"signingCredential.untrusted", "timeStamp.untrusted"})

# Never touch the network: no OCSP, no remote manifests (and no TSA: the signer has no URL).
_OFFLINE = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}
_SIGN_SETTINGS = {**_OFFLINE, "builder": {"thumbnail": {"enabled": False}}}

# Fields of a pipeline record that make up the recipe; the prompts only with include_prompt.
_RECIPE_REQUIRED = ("model", "sampler", "seed", "steps", "guidance", "frames", "width", "height", "fps")
_PROMPT_FIELDS = ("prompt", "negative_prompt", "enhanced_prompt", "conditioning_captions")


class ProvenanceError(ValueError):
    """Signing or reading provenance failed; the message names the file and what to do."""


# --- settings ----------------------------------------------------------------------------


def default_config_dir() -> Path:
    """$SKYLOOM_CONFIG_DIR, else $XDG_CONFIG_HOME/skyloom, else ~/.config/skyloom."""
    if os.environ.get("SKYLOOM_CONFIG_DIR"):
        return Path(os.environ["SKYLOOM_CONFIG_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "skyloom"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


@dataclass
class ProvenanceSettings:
    key_path: Path | None = None  # PEM private key; None: the local development key
    cert_chain_path: Path | None = None  # PEM chain, signing certificate first; with key_path
    include_prompt: bool = False  # write the prompt into the manifest (it is public to anyone with the file)
    config_dir: Path = field(default_factory=default_config_dir)  # holds c2pa/ (the development CA)
    trust_anchors_path: Path | None = None  # PEM trust anchors; None: the development CA in config_dir

    def __post_init__(self):
        self.config_dir = Path(self.config_dir).expanduser()
        for name in ("key_path", "cert_chain_path", "trust_anchors_path"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser())

    @classmethod
    def from_env(cls, *, include_prompt: bool | None = None) -> "ProvenanceSettings":
        """Settings from SKYLOOM_C2PA_KEY, SKYLOOM_C2PA_CERTS, SKYLOOM_C2PA_TRUST_ANCHORS,
        SKYLOOM_CONFIG_DIR and SKYLOOM_C2PA_INCLUDE_PROMPT (1/true/yes), unset ones at their defaults.
        An explicit include_prompt wins over the environment."""
        if include_prompt is None:
            include_prompt = os.environ.get("SKYLOOM_C2PA_INCLUDE_PROMPT", "").strip().lower() in ("1", "true", "yes", "on")
        return cls(
            key_path=_env_path("SKYLOOM_C2PA_KEY"),
            cert_chain_path=_env_path("SKYLOOM_C2PA_CERTS"),
            include_prompt=include_prompt,
            config_dir=default_config_dir(),
            trust_anchors_path=_env_path("SKYLOOM_C2PA_TRUST_ANCHORS"),
        )

    @property
    def dev_dir(self) -> Path:
        """Where the development CA and signing credentials live."""
        return self.config_dir / DEV_DIR_NAME


# --- the recipe --------------------------------------------------------------------------


def recipe_from_record(record: dict, *, include_prompt: bool) -> dict:
    """The generation recipe written into the manifest, from a GenerationResult.record.

    Keeps what reproduces or identifies the generation (model hash, sampler, seed, sizes,
    plugins, watermark payloads) and drops what is private to this machine (paths, device,
    timings, safety decisions). The prompts go in only with include_prompt=True.
    """
    missing = [key for key in _RECIPE_REQUIRED if key not in record]
    if missing:
        raise ProvenanceError(
            f"the result record lacks {', '.join(missing)}: pass GenerationResult.record from a "
            "Pipeline run to recipe_from_record"
        )
    model = record["model"] or {}
    recipe = {
        "skyloom_version": record.get("skyloom_version", _skyloom_version()),
        "model": {key: model.get(key) for key in ("name", "hash", "trained")},
        "sampler": record["sampler"],
        "seed": record["seed"],
        "steps": record["steps"],
        "guidance": record["guidance"],
        # Not an array of numbers: c2pa-rs reads an array of numbers that is the value of a key
        # back as a byte string, mangled (contentauth/c2pa-rs#2570). Frame lists below likewise.
        "guidance_interval": dict(zip(("low", "high"), record.get("guidance_interval", (0.0, 1.0)))),
        "frames": record["frames"],
        "width": record["width"],
        "height": record["height"],
        "fps": record["fps"],
        "upscale": record.get("upscale", 1),
        "plugins": {
            kind: [{k: v for k, v in entry.items() if k in ("name", "package", "version", "injected")} for entry in entries]
            for kind, entries in (record.get("plugins") or {}).items()
        },
        "watermarks": list(record.get("watermarks") or []),
    }
    for key in ("conditioning", "video_edit"):  # present only when the request used them
        if record.get(key):
            recipe[key] = record[key]
    if record.get("loop"):
        loop = dict(record["loop"])
        for key in ("kept_frames", "generated_frames"):  # runs of frames, not arrays of numbers (above)
            if key in loop:
                loop[key] = _runs(loop[key])
        if "conditioning_moved_to" in loop:
            loop["conditioning_moved_to"] = [{"start_frame": start} for start in loop["conditioning_moved_to"]]
        recipe["loop"] = loop
    if include_prompt:
        recipe.update({key: record[key] for key in _PROMPT_FIELDS if key in record})
    return recipe


def _runs(frames: list[int]) -> list[dict]:
    """Sorted frame numbers as runs: [0, 5, 6, 7, 8] -> [{"first": 0, "last": 0}, {"first": 5, "last": 8}]."""
    runs: list[dict] = []
    for frame in sorted(frames):
        if runs and frame == runs[-1]["last"] + 1:
            runs[-1]["last"] = frame
        else:
            runs.append({"first": frame, "last": frame})
    return runs


def _skyloom_version() -> str:
    from skyloom import __version__

    return __version__


def manifest_definition(recipe: dict, *, title: str | None = None) -> dict:
    """The c2pa Builder definition: created by a trained model, with the skyloom recipe."""
    version = _skyloom_version()
    agent = {"name": "skyloom", "version": version}
    definition = {
        "claim_generator_info": [agent],
        "assertions": [
            {
                "label": ACTIONS_LABEL,
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": agent,
                            "description": "Generated by a text-to-video diffusion model with skyloom",
                        }
                    ]
                },
            },
            {"label": RECIPE_LABEL, "data": recipe},
        ],
    }
    if title:
        definition["title"] = title
    return definition


# --- files: formats and atomic writes ----------------------------------------------------


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise ProvenanceError(f"cannot read {what} {str(path)!r}: no such file")
    if not path.is_file():
        raise ProvenanceError(f"cannot read {what} {str(path)!r}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ProvenanceError(f"cannot read {what} {str(path)!r}: permission denied")
    if path.stat().st_size == 0:
        raise ProvenanceError(f"cannot read {what} {str(path)!r}: the file is empty")


def sniff_format(path: Path) -> str | None:
    """The MIME type c2pa needs, from the file's first bytes (temporary files have no useful suffix)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) == 12 and head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:12] == b"qt  " else "video/mp4"
    return None


def has_embedded_manifest(path: Path) -> bool:
    """Whether the file carries a C2PA manifest store (BMFF uuid box or PNG caBX chunk), read or not."""
    fmt = sniff_format(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if fmt in ("video/mp4", "video/quicktime"):
            offset = 0
            while offset + 8 <= size:  # top-level boxes: [size:4][type:4]([largesize:8])[usertype:16 for uuid]
                f.seek(offset)
                header = f.read(32)
                if len(header) < 8:
                    return False
                box_size, box_type = struct.unpack(">I4s", header[:8])
                body = 8
                if box_size == 1 and len(header) >= 16:
                    box_size, body = struct.unpack(">Q", header[8:16])[0], 16
                elif box_size == 0:
                    box_size = size - offset
                if box_type == b"uuid" and header[body : body + 16] == C2PA_BMFF_UUID:
                    return True
                if box_size < 8:
                    return False
                offset += box_size
        elif fmt == "image/png":
            offset = 8
            while offset + 8 <= size:
                f.seek(offset)
                header = f.read(8)
                if len(header) < 8:
                    return False
                length, chunk = struct.unpack(">I4s", header)
                if chunk == b"caBX":
                    return True
                offset += 12 + length
    return False


def _temp_beside(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.{tag}.tmp"


# --- signing credentials -----------------------------------------------------------------


@dataclass(frozen=True)
class SigningCredentials:
    key_pem: bytes  # PKCS#8, unencrypted
    chain_pem: bytes  # signing certificate first
    alg: str  # "es256", "ps256", "ed25519", ...
    key_path: Path
    chain_path: Path
    subject: str  # the signing certificate's subject, for messages


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skyloom local development"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _key_usage(**enabled):
    from cryptography import x509

    flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{flag: enabled.get(flag, False) for flag in flags})


def create_dev_credentials() -> dict[str, bytes]:
    """A fresh development CA and signing certificate: {file name: PEM bytes}. Offline, no side effects."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

    tag = secrets.token_hex(4)  # tells one user's development CA from another's, without naming them
    now = _now()
    start = now - datetime.timedelta(hours=1)  # tolerate small clock skew between machines
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"skyloom development CA {tag}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    document_signing = ObjectIdentifier("1.3.6.1.5.5.7.3.36")
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"skyloom signer {tag}"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=5 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION, document_signing]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        DEV_CA_CERT: ca_cert.public_bytes(pem),
        DEV_SIGNER_CHAIN: cert.public_bytes(pem) + ca_cert.public_bytes(pem),
        DEV_SIGNER_KEY: key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # the umask cannot loosen it, nor tighten the certificates below readable


def ensure_dev_credentials(config_dir: Path) -> Path:
    """The development CA directory <config_dir>/c2pa, created on first use; returns it.

    The files are written into a private temporary directory that is then renamed into place,
    so a reader sees all of them or none, and two processes starting at once agree on one CA.
    Private keys are mode 0600, the directory 0700; a .gitignore keeps them out of commits.
    """
    config_dir = Path(config_dir)
    target = config_dir / DEV_DIR_NAME
    names = (DEV_CA_CERT, DEV_SIGNER_CHAIN, DEV_SIGNER_KEY)
    if target.exists():
        missing = [name for name in names if not (target / name).is_file()]
        if missing:
            raise ProvenanceError(
                f"the development signing directory {str(target)!r} is incomplete (missing {', '.join(missing)}); "
                "delete it to create a new development CA, or set SKYLOOM_C2PA_KEY and SKYLOOM_C2PA_CERTS"
            )
        return target
    try:
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEV_DIR_NAME}-", dir=config_dir))  # mode 0700
    except OSError as error:
        raise ProvenanceError(
            f"cannot create the development signing certificate in {str(config_dir)!r}: {error.strerror or error}; "
            "set SKYLOOM_CONFIG_DIR to a writable directory, or SKYLOOM_C2PA_KEY and SKYLOOM_C2PA_CERTS"
        ) from error
    try:
        for name, data in create_dev_credentials().items():
            _write_new(staging / name, data, 0o600 if name.endswith("key.pem") else 0o644)
        _write_new(staging / ".gitignore", b"# signing keys: never commit\n*\n", 0o644)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not the race we expect: another process created it first
                raise
    except OSError as error:
        raise ProvenanceError(
            f"cannot create the development signing certificate in {str(target)!r}: {error.strerror or error}"
        ) from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _read_file(path: Path, what: str, hint: str) -> bytes:
    if not path.exists():
        raise ProvenanceError(f"{what} {str(path)!r} does not exist; {hint}")
    try:
        return path.read_bytes()
    except OSError as error:
        raise ProvenanceError(f"cannot read {what} {str(path)!r}: {error.strerror or error}; {hint}") from error


def _signing_alg(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in algs:
            return algs[key.curve.name]
        raise ValueError(f"elliptic curve {key.curve.name} (C2PA signs with P-256, P-384 or P-521)")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"a {type(key).__name__} (C2PA signs with EC P-256/384/521, RSA-PSS or Ed25519 keys)")


CERTIFICATE_PROFILE = (
    "a C2PA signing certificate needs keyUsage digitalSignature, extendedKeyUsage emailProtection "
    "(1.3.6.1.5.5.7.3.4), basicConstraints CA:false, an authorityKeyIdentifier, and a current validity period"
)


def certificate_problems(cert) -> list[str]:
    """What keeps `cert` from being a C2PA signing certificate (C2PA's certificate profile), if anything."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

    def extension(kind):
        try:
            return cert.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            return None

    problems = []
    constraints = extension(x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        problems.append("it is a CA certificate (basicConstraints CA:true)")
    usage = extension(x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        problems.append("its keyUsage lacks digitalSignature")
    eku = extension(x509.ExtendedKeyUsage)
    signing_ekus = {ExtendedKeyUsageOID.EMAIL_PROTECTION, ObjectIdentifier("1.3.6.1.5.5.7.3.36")}
    if eku is None or not signing_ekus & set(eku):
        problems.append("its extendedKeyUsage lacks emailProtection (1.3.6.1.5.5.7.3.4)")
    if cert.issuer != cert.subject and extension(x509.AuthorityKeyIdentifier) is None:
        problems.append("it has no authorityKeyIdentifier")
    return problems


def load_credentials(settings: ProvenanceSettings) -> SigningCredentials:
    """The configured key and certificate chain, checked; or the development ones, created on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if (settings.key_path is None) != (settings.cert_chain_path is None):
        given, other = ("SKYLOOM_C2PA_KEY", "SKYLOOM_C2PA_CERTS") if settings.key_path else ("SKYLOOM_C2PA_CERTS", "SKYLOOM_C2PA_KEY")
        raise ProvenanceError(
            f"{given} is set but {other} is not: a signing key needs its certificate chain and the other way "
            "round; set both, or neither to sign with the local development certificate"
        )
    if settings.key_path is None:
        directory = ensure_dev_credentials(settings.config_dir)
        key_path, chain_path = directory / DEV_SIGNER_KEY, directory / DEV_SIGNER_CHAIN
        hint = f"delete {str(directory)!r} to create a new development certificate"
    else:
        key_path, chain_path = settings.key_path, settings.cert_chain_path
        hint = ("set SKYLOOM_C2PA_KEY and SKYLOOM_C2PA_CERTS to a PEM private key and its PEM certificate chain, "
                "or unset both to sign with the local development certificate")

    key_data = _read_file(key_path, "signing key", hint)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ProvenanceError(
            f"signing key {str(key_path)!r} is encrypted; skyloom needs an unencrypted PEM key "
            "(e.g. `openssl pkey -in KEY -out KEY.plain`, kept at mode 0600)"
        ) from None
    except ValueError as error:
        raise ProvenanceError(f"signing key {str(key_path)!r} is not a PEM private key ({error}); {hint}") from None
    try:
        alg = _signing_alg(key)
    except ValueError as error:
        raise ProvenanceError(f"signing key {str(key_path)!r} is {error}") from None

    chain_data = _read_file(chain_path, "certificate chain", hint)
    try:
        chain = x509.load_pem_x509_certificates(chain_data)
    except ValueError as error:
        raise ProvenanceError(f"certificate chain {str(chain_path)!r} is not PEM certificates ({error}); {hint}") from None
    cert = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ProvenanceError(
            f"the certificate chain {str(chain_path)!r} does not match the signing key {str(key_path)!r}: its first "
            f"certificate ({cert.subject.rfc4514_string()}) is for another key; put the key's own certificate first"
        )
    problems = certificate_problems(cert)
    if problems:
        raise ProvenanceError(
            f"the signing certificate in {str(chain_path)!r} ({cert.subject.rfc4514_string()}) cannot sign C2PA "
            f"manifests: {'; '.join(problems)}. {CERTIFICATE_PROFILE[0].upper()}{CERTIFICATE_PROFILE[1:]}"
        )
    now = _now()
    if now > cert.not_valid_after_utc:
        raise ProvenanceError(
            f"the signing certificate in {str(chain_path)!r} ({cert.subject.rfc4514_string()}) expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; {hint}"
        )
    if now < cert.not_valid_before_utc:
        raise ProvenanceError(
            f"the signing certificate in {str(chain_path)!r} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock"
        )
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return SigningCredentials(pkcs8, chain_data, alg, key_path, chain_path, cert.subject.rfc4514_string())


def trust_anchors_pem(settings: ProvenanceSettings) -> str | None:
    """The PEM trust anchors for reading: the configured file, else the development CA if it exists."""
    from cryptography import x509

    path = settings.trust_anchors_path
    if path is None:
        dev_ca = settings.dev_dir / DEV_CA_CERT
        return dev_ca.read_text() if dev_ca.is_file() else None
    data = _read_file(path, "trust anchors file", "set SKYLOOM_C2PA_TRUST_ANCHORS to a PEM file of root certificates")
    if not data.strip():
        return None  # an empty file: trust nothing
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise ProvenanceError(f"trust anchors file {str(path)!r} is not PEM certificates ({error})") from None
    return data.decode("ascii")


# --- signing -----------------------------------------------------------------------------


def _sign_failure(source: Path, error: Exception, credentials: SigningCredentials) -> ProvenanceError:
    message = str(error)
    if "EKU" in message:
        hint = (f"c2pa does not accept the extendedKeyUsage of the signing certificate {credentials.subject}; "
                "include emailProtection (1.3.6.1.5.5.7.3.4)")
    elif "signingCredential" in message or "certificate" in message.lower():
        hint = (f"c2pa rejected the signing certificate in {str(credentials.chain_path)!r} "
                f"({credentials.subject}); {CERTIFICATE_PROFILE}")
    else:
        hint = "the file may not be an MP4 c2pa can write into"
    return ProvenanceError(f"cannot sign {str(source)!r}: {hint} (c2pa: {message})")


def sign_file(
    source: Path,
    dest: Path,
    recipe: dict,
    *,
    settings: ProvenanceSettings | None = None,
    title: str | None = None,
) -> None:
    """Write `source` (an MP4, MOV or PNG just written by skyloom) to `dest` with a signed C2PA manifest.

    recipe: from recipe_from_record; it goes into the manifest as it is (JSON values only).
    settings: keys, trust and config directory (default: ProvenanceSettings.from_env()).
    title: the asset's title in the manifest, e.g. the final file name (default: none).

    `dest` is replaced atomically: on any error it is left as it was and a ProvenanceError (or
    the KeyboardInterrupt) propagates. `source` is never modified; `dest` may be a temporary path.
    """
    import c2pa

    source, dest = Path(source), Path(dest)
    settings = settings or ProvenanceSettings.from_env()
    _check_readable(source, "video")
    mime = sniff_format(source)
    if mime not in ("video/mp4", "video/quicktime", "image/png"):
        raise ProvenanceError(f"cannot sign {str(source)!r}: it is not an MP4, MOV or PNG file")
    try:
        definition = json.dumps(manifest_definition(recipe, title=title), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ProvenanceError(f"cannot sign {str(source)!r}: the recipe is not plain JSON ({error})") from None
    if not dest.parent.is_dir():
        raise ProvenanceError(f"cannot write {str(dest)!r}: the directory {str(dest.parent)!r} does not exist")
    credentials = load_credentials(settings)

    temp = _temp_beside(dest, "c2pa")
    try:
        with open(temp, "xb"):  # exclusive: never clobber anything
            pass
    except OSError as error:
        raise ProvenanceError(f"cannot write {str(dest)!r}: {error.strerror or error}") from error
    try:
        info = c2pa.C2paSignerInfo(credentials.alg, credentials.chain_pem, credentials.key_pem, None)  # None: no TSA
        with c2pa.Signer.from_info(info) as signer, c2pa.Context.from_dict(_SIGN_SETTINGS) as context:
            builder = c2pa.Builder(definition, context=context)
            with builder, open(source, "rb") as src, open(temp, "w+b") as dst:
                builder.sign(signer, mime, src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(temp, dest)
    except c2pa.C2paError as error:
        raise _sign_failure(source, error, credentials) from error
    except OSError as error:
        raise ProvenanceError(f"cannot write {str(dest)!r}: {error.strerror or error}") from error
    finally:
        temp.unlink(missing_ok=True)


def write_signed_media(
    path: Path,
    frames,
    fps: float,
    record: dict,
    *,
    settings: ProvenanceSettings | None = None,
    **video_options,
) -> Path:
    """Write frames by suffix (skyloom.video_io.write_media) and sign them in one step: what
    GenerationResult.save does. `path` appears only once complete and signed; on any error it
    is left as it was. The unsigned intermediate is a hidden file beside `path`, always removed.
    video_options (crf, preset, ...) go to write_media. Returns the path.
    """
    from skyloom.video_io import write_media

    path = Path(path)
    settings = settings or ProvenanceSettings.from_env()
    recipe = recipe_from_record(record, include_prompt=settings.include_prompt)  # fail before any work
    unsigned = path.parent / f".{path.name}.{secrets.token_hex(4)}.unsigned{path.suffix}"  # write_media reads the suffix
    try:
        write_media(unsigned, frames, fps, **video_options)
        sign_file(unsigned, path, recipe, settings=settings, title=path.name)
    finally:
        unsigned.unlink(missing_ok=True)
    return path


# --- reading -----------------------------------------------------------------------------


@dataclass
class ManifestReport:
    present: bool  # the file carries a C2PA manifest store
    valid: bool  # intact and correctly signed (says nothing about who signed)
    trusted: bool  # valid, and the signing certificate chains to a trust anchor
    recipe: dict | None  # the org.skyloom.recipe assertion, as the manifest states it
    errors: list[str] = field(default_factory=list)  # why it is not valid: "code: explanation"
    warnings: list[str] = field(default_factory=list)  # why a valid manifest is not trusted
    active_manifest: str | None = None  # the active manifest's label (urn:c2pa:...)
    claim_generator: str | None = None  # e.g. "skyloom/0.1.0"
    digital_source_type: str | None = None  # of the c2pa.created action
    signer: dict | None = None  # {"organization", "common_name", "alg"} of the signing certificate

    @property
    def ai_generated(self) -> bool:
        """The manifest declares the content made by a trained model (true or not, if untrusted)."""
        return self.digital_source_type == TRAINED_ALGORITHMIC_MEDIA

    def as_dict(self) -> dict:
        return {**asdict(self), "ai_generated": self.ai_generated}


def _describe(status: dict) -> str:
    code, explanation = status.get("code", "unknown"), status.get("explanation")
    return f"{code}: {explanation}" if explanation else code


def _report(store: dict, state: str | None) -> ManifestReport:
    label = store.get("active_manifest")
    manifest = (store.get("manifests") or {}).get(label) or {}
    statuses = store.get("validation_status") or []
    errors = [_describe(s) for s in statuses if s.get("code") not in TRUST_CODES]
    warnings = [_describe(s) for s in statuses if s.get("code") in TRUST_CODES]
    valid = state in ("Valid", "Trusted") if state else not errors
    if not valid and not errors:
        errors.append(f"validation state {state}")
    if not label:
        valid = False
        errors.append("the manifest store has no active manifest")

    recipe, source_type = None, None
    for assertion in manifest.get("assertions") or []:
        if assertion.get("label") == RECIPE_LABEL:
            recipe = assertion.get("data")
        elif assertion.get("label") in ("c2pa.actions", "c2pa.actions.v2"):
            for action in (assertion.get("data") or {}).get("actions") or []:
                if action.get("action") == "c2pa.created":
                    source_type = action.get("digitalSourceType")
    generator = manifest.get("claim_generator")
    info = (manifest.get("claim_generator_info") or [None])[0]
    if isinstance(info, dict) and info.get("name"):
        generator = f"{info['name']}/{info['version']}" if info.get("version") else info["name"]
    signature = manifest.get("signature_info") or {}
    # c2pa calls the signing certificate's organisation "issuer": it is the signer's, not its CA's.
    signer = {"organization": signature.get("issuer"), "common_name": signature.get("common_name"),
              "alg": signature.get("alg")} if signature else None
    return ManifestReport(
        present=True, valid=valid, trusted=valid and state == "Trusted", recipe=recipe, errors=errors,
        warnings=warnings, active_manifest=label, claim_generator=generator,
        digital_source_type=source_type, signer=signer,
    )


def read_manifest(path: Path, *, settings: ProvenanceSettings | None = None) -> ManifestReport:
    """Read and validate the C2PA manifest of a file, offline.

    A file without a manifest gives present=False; a manifest that fails validation (the
    video changed after signing, or the manifest itself was altered) gives valid=False and
    the reasons in `errors`. A file that cannot be read at all raises ProvenanceError.
    """
    import c2pa

    path = Path(path)
    settings = settings or ProvenanceSettings.from_env()
    _check_readable(path, "file")
    mime = sniff_format(path)
    read_settings = {**_OFFLINE, "verify": {**_OFFLINE["verify"], "verify_trust": True}}
    anchors = trust_anchors_pem(settings)
    if anchors:
        read_settings["trust"] = {"user_anchors": anchors}
    try:
        with c2pa.Context.from_dict(read_settings) as context, open(path, "rb") as stream:
            reader = c2pa.Reader.try_create(mime, stream, context=context)
            if reader is None:
                return ManifestReport(present=False, valid=False, trusted=False, recipe=None)
            with reader:
                return _report(json.loads(reader.json()), reader.get_validation_state())
    except c2pa.C2paError as error:
        if mime is not None and has_embedded_manifest(path):
            return ManifestReport(
                present=True, valid=False, trusted=False, recipe=None,
                errors=[f"the manifest could not be read, it is damaged or was altered: {error}"],
            )
        kind = {"video/mp4": "an MP4", "video/quicktime": "a MOV", "image/png": "a PNG", "image/jpeg": "a JPEG"}.get(mime)
        problem = f"it looks like {kind} but could not be parsed" if kind else "it is not an MP4, MOV, PNG or JPEG file"
        raise ProvenanceError(
            f"cannot read provenance from {str(path)!r}: {problem} ({error}); is the file complete?"
        ) from error
    except OSError as error:
        raise ProvenanceError(f"cannot read {str(path)!r}: {error.strerror or error}") from error
