"""The `skyloom` command: a thin layer over the Python API (docs/api.md)."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import click

from skyloom.datasets.shapes import shapes_command
from skyloom.process_map import available_cpus

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png",)


class SkyloomCLIError(click.ClickException):
    """An error shown as one line, 'error: ...', with exit status 1."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _registry():
    """The process-wide registry, or a strictly loaded one under `skyloom --strict-plugins`."""
    from skyloom.registry import PluginClashError, PluginLoadError, Registry, get_registry

    context = click.get_current_context(silent=True)
    strict = bool(context and context.find_root().params.get("strict_plugins"))
    try:
        return Registry.load(strict=True) if strict else get_registry()
    except (PluginLoadError, PluginClashError) as error:
        raise SkyloomCLIError(str(error)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skyloom")
@click.option("--strict-plugins", is_flag=True, help="A plugin that fails to load is an error (also SKYLOOM_STRICT_PLUGINS=1).")
def main(strict_plugins: bool) -> None:
    """skyloom: Sora-style video generation with swappable plugins."""


def _check_output(output: Path, frames: int | None) -> None:
    """Fail before any work if the output cannot be written."""
    suffix = output.suffix.lower()
    if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise SkyloomCLIError(f"output {output}: unsupported file type {suffix or '(none)'!r}; use .mp4 for video or .png for one frame")
    if suffix in IMAGE_SUFFIXES and frames is not None and frames != 1:
        raise SkyloomCLIError(f"output {output}: a .png holds one frame but --frames is {frames}; use .mp4 or --frames 1")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise SkyloomCLIError(f"output {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SkyloomCLIError(f"output {output}: directory {parent} is not writable")
    if output.is_dir():
        raise SkyloomCLIError(f"output {output} is a directory; give a file name ending in .mp4 or .png")


def _parse_condition(text: str) -> tuple[Path, int]:
    """'FILE' or 'FILE@FRAME' (FRAME an integer, negative from the end) -> (path, start frame)."""
    path, at, frame = text.rpartition("@")
    if at and re.fullmatch(r"[+-]?\d+", frame):
        return Path(path), int(frame)
    return Path(text), 0


def _read_media(option: str, path: Path):
    """(frames, fps) of an image or video given to `option`."""
    from skyloom.video_io import read_video

    try:
        return read_video(path)
    except ValueError as error:
        raise SkyloomCLIError(f"{option}: {error}") from None


@main.command()
@click.argument("prompt")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file: .mp4 (video) or .png (one frame).")
@click.option("--frames", type=int, help="Number of frames (model default if omitted; 1 for an image).")
@click.option("--size", help="WIDTHxHEIGHT, e.g. 64x64 or 80x48 (model default if omitted).")
@click.option("--fps", type=float, help="Frames per second of the output.")
@click.option("--steps", type=int, help="Sampling steps.")
@click.option("--sampler", help="Sampler name (see `skyloom plugins`).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale (1 = no guidance).")
@click.option("--guidance-interval", type=float, nargs=2, metavar="LOW HIGH",
              help="Guide only the model evaluations at a time t (1 = noise, 0 = data) in [LOW, HIGH], e.g. 0.5 1 "
                   "leaves the last, least noisy steps unguided; 0 1 guides every step (model default if omitted).")
@click.option("--seed", type=int, help="Random seed (random if omitted; recorded with --json).")
@click.option("--negative", default="", help="Negative prompt: what the video should not show.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Model directory (default: the embedded model).")
@click.option("--prompt-enhancer", help="Rewrite the prompt with this prompt_enhancer plugin ('none' to disable).")
@click.option("--condition", "conditions", multiple=True, metavar="FILE[@FRAME]",
              help="Known frames: an image or a video placed at output frame FRAME: 0 (the default) or the start of a "
                   "latent frame, 1 + k·4 for the embedded model; negative counts from the end. Repeatable. "
                   "Image-to-video: --condition first.png; extending forward: --condition clip.mp4 with more --frames; "
                   "connecting two scenes in 17 frames: --condition a.png --condition b.png@-4 (the last 4 frames).")
@click.option("--video", "video_path", type=click.Path(path_type=Path),
              help="Edit this video (SDEdit): noise it by --strength and denoise it toward PROMPT. Its length and frame "
                   "rate are the defaults of --frames and --fps; it is resized to --size.")
@click.option("--strength", type=float, help="With --video: the share of the sampling steps run from the noised video; 1 redraws it all.  [default: 0.8]")
@click.option("--loop", is_flag=True, help="Make the video loop: the frames between its end and its start are generated anew "
                                         "(a second sampling pass); --condition frames stay known. Not with --video.")
@click.option("--upscale", type=int, default=1, show_default=True, help="Resize the frames by this factor (Lanczos) before writing, e.g. 4 for 64x64 -> 256x256.")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True, help="H.264 quality (lower is better).")
@click.option("--include-prompt", is_flag=True, help="Put the prompt into the signed C2PA recipe (left out by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the result record (everything but the frames) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes.")
def generate(prompt, output, frames, size, fps, steps, sampler, guidance, guidance_interval, seed, negative, model_dir, prompt_enhancer,
             conditions, video_path, strength, loop, upscale, crf, include_prompt, as_json, quiet):
    """Generate a video (or a single frame) from PROMPT and write it to --output."""
    from skyloom.bundle import BundleError
    from skyloom.pipeline import DEFAULT, Pipeline, SafetyRefusal
    from skyloom.provenance import ProvenanceSettings
    from skyloom.registry import UnknownPluginError
    from skyloom.request import Conditioning, GenerationRequest, RequestError, parse_size

    if output.suffix.lower() in IMAGE_SUFFIXES and frames is None and video_path is None:
        frames = 1
    _check_output(output, frames)
    if strength is not None and video_path is None:
        raise SkyloomCLIError("--strength applies only to editing a video: add --video FILE")
    conditioning = []
    for text in conditions:
        path, start = _parse_condition(text)
        conditioning.append(Conditioning(_read_media(f"--condition {text}", path)[0], start))
    video = None
    if video_path is not None:
        video, video_fps = _read_media(f"--video {video_path}", video_path)
        frames = video.shape[0] if frames is None else frames
        fps = video_fps if fps is None and video_fps > 0 else fps
        _check_output(output, frames)
    extra = {} if strength is None else {"strength": strength}
    try:
        width, height = parse_size(size) if size else (None, None)
        registry = _registry()
        enhancer = DEFAULT if prompt_enhancer is None else (None if prompt_enhancer.lower() == "none" else prompt_enhancer)
        pipeline = Pipeline.from_pretrained(model_dir, registry=registry, prompt_enhancer=enhancer)
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, frames=frames, width=width, height=height,
            fps=fps, steps=steps, guidance=guidance, guidance_interval=guidance_interval, seed=seed, sampler=sampler, upscale=upscale,
            conditioning=tuple(conditioning), video=video, loop=loop, **extra,
        )
        result = pipeline(request, progress=not quiet and sys.stdout.isatty())
        result.save(output, crf=crf, provenance=ProvenanceSettings.from_env(include_prompt=include_prompt or None))
    except SafetyRefusal as refusal:
        click.echo(f"refused: {refusal}", err=True)
        sys.exit(3)
    except RequestError as error:  # conditioning[i] is the i-th --condition
        message = re.sub(r"^conditioning\[(\d+)\]", lambda m: f"--condition {conditions[int(m[1])]}", str(error))
        raise SkyloomCLIError(message) from None
    except (BundleError, UnknownPluginError, ValueError, OSError) as error:
        raise SkyloomCLIError(str(error)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    except Exception as error:  # e.g. out of memory: one line, not a traceback
        raise SkyloomCLIError(f"{type(error).__name__}: {error}") from None
    if not pipeline.bundle.trained and not quiet:
        click.echo(f"note: model {pipeline.bundle.name!r} is untrained (random weights): the video does not follow the prompt", err=True)
    watermarking = result.record["stages"].get("watermarking", {})
    if watermarking.get("status") == "skipped" and result.record["plugins"]["watermarker"] and not quiet:
        click.echo(f"note: not watermarked: {watermarking['reason']}", err=True)
    if as_json:
        click.echo(json.dumps(result.record, indent=2, default=str))
    elif not quiet:
        click.echo(f"wrote {output} ({result.frames.shape[0]} frames, {result.frames.shape[2]}x{result.frames.shape[1]}, seed {result.record['seed']})", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of {kind, name, aliases, plugin, package, version}.")
def plugins(as_json):
    """List every installed plugin component, by kind."""
    from skyloom.kinds import KINDS

    registry = _registry()
    infos = registry.all()
    if as_json:
        click.echo(json.dumps([info.as_dict() for info in infos], indent=2))
        return
    for kind in KINDS:
        click.echo(f"{kind}:")
        names = [i for i in infos if i.kind == kind]
        if not names:
            click.echo("  (none)")
        for info in names:
            aliases = f" (aliases: {', '.join(info.aliases)})" if info.aliases else ""
            click.echo(f"  {info.name}{aliases}  [{info.package} {info.version}]")
    for plugin, error in registry.load_errors:
        click.echo(f"failed to load: {plugin}: {error}", err=True)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json):
    """Report what was built, which devices are usable, and the versions in use."""
    import torch

    from skyloom import _C

    report = {
        "skyloom": _version("skyloom"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "build": _C.build_info(),
        "devices": {
            "cpu": {"usable": True, "threads": torch.get_num_threads()},
            "cuda": {
                "usable": torch.cuda.is_available(),
                "torch_cuda": torch.version.cuda,
                "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            },
        },
        "versions": {name: _version(name) for name in ("torch", "av", "numpy", "pluggy", "safetensors", "transformers", "click", "tqdm")},
    }
    registry = _registry()
    packages = {}
    for info in registry.all():
        packages.setdefault(info.package or info.plugin, info.version)
    report["plugin_packages"] = packages
    report["plugin_load_errors"] = [{"plugin": p, "error": e} for p, e in registry.load_errors]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    build = report["build"]
    click.echo(f"skyloom {report['skyloom']} on Python {report['python']} ({report['platform']})")
    click.echo(f"extension: built with {build['compiler']} against torch {build['torch_version']}; "
               f"CUDA kernels: {'yes (' + build['cuda_archs'] + ')' if build['cuda'] else 'no'}; OpenMP: {'yes' if build['openmp'] else 'no'}")
    cuda = report["devices"]["cuda"]
    click.echo(f"devices: cpu ({report['devices']['cpu']['threads']} threads)"
               + (f", cuda: {', '.join(cuda['devices'])}" if cuda["usable"] else ", cuda: not usable"
                  + (f" (torch built with CUDA {cuda['torch_cuda']})" if cuda["torch_cuda"] else " (CPU-only torch)")))
    click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    click.echo("plugin packages: " + ", ".join(f"{k} {v}".strip() for k, v in packages.items()))
    for item in report["plugin_load_errors"]:
        click.echo(f"failed to load: {item['plugin']}: {item['error']}")


@main.group()
def safety():
    """Safety tools for moderation pipelines."""


@safety.command("check")
@click.argument("prompts", nargs=-1)
@click.option("--file", "prompt_file", type=click.File("r"), help="Read prompts from this file, one per line ('-' for stdin).")
@click.option("--filter", "filters", multiple=True, help="Safety filter to run (repeatable; default: every registered one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt (JSON Lines).")
def safety_check(prompts, prompt_file, filters, as_json):
    """Run only the prompt safety filters: one decision per prompt.

    Exit status: 0 when every prompt is allowed, 3 when any is refused.
    """
    prompts = list(prompts)
    if prompt_file is not None:
        prompts += [line.rstrip("\n") for line in prompt_file if line.strip()]
    if not prompts:
        raise SkyloomCLIError("no prompts: pass them as arguments or with --file")
    from skyloom.pipeline import check_text
    from skyloom.registry import UnknownPluginError

    registry = _registry()
    names = list(filters) or registry.names("safety_filter")
    try:  # built once for the whole list
        loaded = [(registry.create("safety_filter", n), {"name": registry.get("safety_filter", n).name}) for n in names]
    except UnknownPluginError as error:
        raise SkyloomCLIError(str(error)) from None
    refused_any = False
    for prompt in prompts:
        decisions = check_text(loaded, prompt, "prompt_safety")
        refusal = next((d for d in decisions if not d.allowed), None)
        refused_any |= refusal is not None
        if as_json:
            click.echo(json.dumps({
                "prompt": prompt,
                "allowed": refusal is None,
                "category": refusal.category if refusal else None,
                "reason": refusal.reason if refusal else "",
                "filter": refusal.filter if refusal else None,
                "decisions": [vars(d) for d in decisions],
            }))
        elif refusal is None:
            click.echo(f"allowed\t{prompt}")
        else:
            click.echo(f"refused\t{refusal.category}\t{refusal.filter}: {refusal.reason}\t{prompt}")
    sys.exit(3 if refused_any else 0)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def verify(file, as_json):
    """Check FILE's C2PA manifest and look for skyloom watermarks.

    Tells apart: signed and intact; signed but no watermark found; tampered (manifest invalid,
    exit status 2); manifest stripped (e.g. by re-encoding) but watermark found; neither.
    """
    from skyloom.provenance import ProvenanceError
    from skyloom.verify import format_report, verify as verify_file
    from skyloom.video_io import VideoIOError

    registry = _registry()
    try:
        markers = [(name, registry.create("watermarker", name)) for name in registry.names("watermarker")]
        report = verify_file(file, watermarkers=markers)
    except (ProvenanceError, VideoIOError, ValueError) as error:
        raise SkyloomCLIError(str(error)) from None
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if report["verdict"] == "tampered":
        sys.exit(2)


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), required=True, help="Directory for the run: data, captions, checkpoints, log.")
@click.option("--out", "output", type=click.Path(path_type=Path), help="Model bundle to write (default: the config's \"output\").")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its latest checkpoint (a finished run writes its bundle again).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="Minutes to train in this run; then checkpoint and stop (continue with --resume).")
@click.option("--workers", type=click.IntRange(min=1), default=available_cpus, show_default="the cores this process may use",
              help="Processes that make, read and caption the clips; the weights are the same for any number.")
def train(config, run_dir, output, resume, time_limit, workers):
    """Train the video autoencoder, then the transformer, as CONFIG (JSON) says, and write a model bundle.

    With "init" in CONFIG both start from a trained bundle's weights (fine-tuning; with
    "init_transformer": false, only the autoencoder, and the transformer trains afresh). Ctrl-C (or
    --time-limit) finishes the current step, writes a checkpoint and stops; run the same command
    with --resume to continue exactly where it stopped. A resume may change only the sampling
    defaults that training does not read (sampler, steps, guidance, ...): a finished run then
    writes its bundle again with the new ones. docs/training.md has the config's keys.
    """
    from skyloom.datasets.shapes import DatasetError
    from skyloom.training import StopRequested, TrainingError, load_config
    from skyloom.training import train as run_training
    from skyloom.video_io import VideoIOError

    # --out is not stored with the run, so the hint repeats it: without it a resumed run writes the
    # config's "output", which for the embedded model's recipe is the bundle inside the package.
    resume_command = shlex.join(
        ["skyloom", "train", str(config), "--run-dir", str(run_dir), *(["--out", str(output)] if output else []), "--resume"]
    )
    try:
        settings = load_config(config)
        bundle = run_training(
            settings, run_dir, registry=_registry(), output=output, base_dir=config.resolve().parent, resume=resume,
            time_limit_s=None if time_limit is None else time_limit * 60, progress=sys.stderr.isatty(), workers=workers,
        )
    except StopRequested as stop:
        click.echo(f"{stop}; the checkpoint is in {run_dir}; continue with: {resume_command}", err=True)
        sys.exit(130 if stop.reason == "interrupted" else 75)
    except KeyboardInterrupt:
        click.echo(f"interrupted: checkpoints already written in {run_dir} are kept; continue with: {resume_command}", err=True)
        sys.exit(130)
    except (TrainingError, DatasetError, VideoIOError, ValueError, OSError) as error:
        raise SkyloomCLIError(str(error)) from None
    click.echo(f"wrote model bundle {bundle} (log: {run_dir / 'log.jsonl'})")


@main.group()
def dataset():
    """Make training data."""


dataset.add_command(shapes_command)


# --- skyloom eval --------------------------------------------------------------------------


def _eval_settings(sizes: tuple[str, ...], frame_counts: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """--size and --frames (each repeatable or a comma list) -> [(width, height, frames)], in order, no repeats."""
    from skyloom.evaluation import DEFAULT_SETTING
    from skyloom.request import RequestError, parse_size

    try:
        parsed_sizes = [parse_size(part.strip()) for text in sizes for part in text.split(",") if part.strip()]
    except RequestError as error:
        raise SkyloomCLIError(f"--size: {error}") from None
    durations = []
    for part in (p.strip() for text in frame_counts for p in text.split(",") if p.strip()):
        if not part.isdigit() or int(part) < 1:
            raise SkyloomCLIError(f"--frames: {part!r} is not a whole number of frames >= 1, e.g. 17 or 17,33")
        durations.append(int(part))
    settings = [(w, h, f) for w, h in parsed_sizes or [DEFAULT_SETTING[:2]] for f in durations or [DEFAULT_SETTING[2]]]
    return list(dict.fromkeys(settings))


@main.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), metavar="DIR", help="Model directory (default: the embedded model).")
@click.option("--count", type=click.IntRange(min=1), default=120, show_default=True,  # skyloom.evaluation.DEFAULT_COUNT (imported lazily)
              help="Prompts in the held-out set; the targets (docs/evaluation.md) need at least 100.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seeds the prompt set and every clip's generation.")
@click.option("--size", "sizes", multiple=True, metavar="WxH", help="WIDTHxHEIGHT to evaluate at; repeat or comma-separate for several (default: 64x64).")
@click.option("--frames", "frame_counts", multiple=True, metavar="N", help="Frames per clip; repeat or comma-separate for several (default: 17).")
@click.option("--steps", type=int, help="Sampling steps (model default if omitted).")
@click.option("--sampler", help="Sampler name (model default if omitted; see `skyloom plugins`).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale (model default if omitted).")
@click.option("--guidance-interval", type=float, nargs=2, metavar="LOW HIGH",
              help="Guide only the model evaluations at a time t (1 = noise, 0 = data) in [LOW, HIGH] (model default if omitted).")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("eval.json"), show_default=True, metavar="FILE",
              help="Write the report here (atomically); after Ctrl-C it holds what was evaluated, marked \"complete\": false.")
@click.option("--videos", "videos_dir", type=click.Path(path_type=Path), metavar="DIR", help="Also save every generated clip as DIR/WxH_Tf/NNNN.mp4.")
@click.option("--reference", is_flag=True, help="Score renders of the prompts' ground truth instead of a model (the analyser's ceiling); the model options are not used.")
@click.option("--known-frames", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Give the model each clip's first N frames of the ground truth (as --reference draws it) and let it generate the rest: 1 scores image-to-video, more score extension; 0 is text-to-video.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; the table is still printed.")
def evaluate_command(model_dir, count, seed, sizes, frame_counts, steps, sampler, guidance, guidance_interval, json_out, videos_dir,
                     reference, known_frames, quiet):
    """Measure prompt adherence: generate from a held-out prompt set and read each clip back with the shapes-world analyser.

    Prints one row per --size x --frames setting: colour, shape, motion, persistence, binding and
    background accuracy (percent) and mean flicker (0..255 levels); writes the full report, with
    every prompt's record, to --json-out. The prompts use phrasings the training captions never
    use, a quarter of them hold the held-out combinations, and half name two objects.
    docs/evaluation.md defines each figure.
    """
    from skyloom.atomic_write import write_atomic
    from skyloom.bundle import BundleError
    from skyloom.evaluation import (
        MIN_COUNT, ContinuationGenerator, ReferenceGenerator, build_prompts, format_table, iter_scores, pipeline_generator, summarise,
    )
    from skyloom.pipeline import DEFAULT, Pipeline
    from skyloom.registry import UnknownPluginError
    from skyloom.request import RequestError

    settings = _eval_settings(sizes, frame_counts)
    parent = json_out.resolve().parent
    if json_out.is_dir():
        raise SkyloomCLIError(f"--json-out {json_out} is a directory; give a file name, e.g. eval.json")
    if not parent.is_dir():
        raise SkyloomCLIError(f"--json-out {json_out}: directory {parent} does not exist")
    if videos_dir is not None and videos_dir.exists() and not videos_dir.is_dir():
        raise SkyloomCLIError(f"--videos {videos_dir} exists and is not a directory")
    if reference and known_frames:
        raise SkyloomCLIError("--reference and --known-frames exclude each other: --reference scores the ground truth itself")
    prompts = build_prompts(count, seed=seed)
    try:
        if reference:
            generate = ReferenceGenerator(prompts)
        else:
            pipeline = Pipeline.from_pretrained(model_dir, registry=_registry(), prompt_enhancer=DEFAULT)
            options = {"steps": steps, "guidance": guidance, "guidance_interval": guidance_interval, "sampler": sampler}
            if known_frames:
                generate = ContinuationGenerator(pipeline, prompts, known_frames, **options)
            else:
                generate = pipeline_generator(pipeline, **options)
            for setting in settings:  # every setting must be generable before any work
                generate.check(*setting)
    except (RequestError, BundleError, UnknownPluginError, ValueError, OSError) as error:
        raise SkyloomCLIError(str(error)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was evaluated", err=True)
        sys.exit(130)
    described = generate.describe()
    if not quiet:
        if not reference and not described["model"]["trained"]:
            click.echo(f"note: model {described['model']['name']!r} is untrained (random weights): expect chance-level scores", err=True)
        if count < MIN_COUNT:
            click.echo(f"note: {count} prompts; the targets (docs/evaluation.md) need at least {MIN_COUNT}", err=True)

    records: list[dict] = []
    interrupted = False
    try:
        for record in iter_scores(generate, prompts, settings, seed=seed, videos=videos_dir, progress=not quiet and sys.stderr.isatty()):
            records.append(record)
    except KeyboardInterrupt:
        interrupted = True
    except (RequestError, UnknownPluginError, ValueError, OSError) as error:
        raise SkyloomCLIError(str(error)) from None
    except Exception as error:  # e.g. out of memory: one line, not a traceback
        raise SkyloomCLIError(f"{type(error).__name__}: {error}") from None
    report = summarise(records, prompts, settings, complete=not interrupted, generator=described, seed=seed)
    try:
        write_atomic(json_out, json.dumps(report, indent=2) + "\n")
    except OSError as error:
        raise SkyloomCLIError(f"cannot write --json-out {json_out}: {error}") from None
    click.echo(format_table(report))
    if interrupted:
        click.echo(f"interrupted: {len(records)} of {len(prompts) * len(settings)} clips evaluated; partial report in {json_out}", err=True)
        sys.exit(130)
    if not quiet:
        click.echo(f"wrote {json_out} ({len(records)} clips)", err=True)
