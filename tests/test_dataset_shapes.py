"""The shapes-world dataset: its clips are what the manifest says, in pixels, deterministically."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from skyloom import shapes_world as world
from skyloom.datasets import shapes
from skyloom.datasets.shapes import (
    DatasetError,
    SceneSpec,
    iter_dataset,
    make_clip,
    read_manifest,
    render,
    sample_scene,
    shapes_command,
    write_dataset,
)
from skyloom.video_io import read_video

seeds = st.integers(0, 2**32)
scene_args = st.fixed_dictionaries({
    "size": st.sampled_from(world.SIZES),
    "frames": st.sampled_from(world.DURATIONS),
    "split": st.sampled_from(["train", "heldout", "all"]),
    "objects": st.sampled_from([1, 2]),
    "min_travel": st.sampled_from([shapes.MIN_TRAVEL, 0.5, shapes.MAX_MIN_TRAVEL]),
    "object_size": st.sampled_from([shapes.OBJECT_SIZE, shapes.OBJECT_SIZE_LIMITS, (0.3, 0.4), (0.15, 0.2)]),
    "gap": st.sampled_from([shapes.GAP, 4, shapes.MAX_GAP]),
}).filter(lambda args: fits(args["object_size"], args["min_travel"]))


def fits(object_size, min_travel) -> bool:
    """Whether the dataset can lay out objects of object_size travelling min_travel."""
    try:
        shapes.check_object_size(object_size, min_travel)
    except DatasetError:
        return False
    return True


def object_pixels(frames: np.ndarray, scene: SceneSpec, index: int, t: int) -> np.ndarray:
    """(H, W) bool: pixels of object `index`'s colour inside its box in frame t."""
    x0, y0, x1, y1 = scene.boxes()[index, t]
    mask = np.zeros(frames.shape[1:3], dtype=bool)
    window = frames[t, y0:y1, x0:x1]
    mask[y0:y1, x0:x1] = (window == np.array(scene.objects[index]["rgb"], dtype=np.uint8)).all(-1)
    return mask


# --- determinism -----------------------------------------------------------------------------


@given(seed=seeds, index=st.integers(0, 10_000))
def test_a_clip_depends_only_on_seed_and_index(seed, index):
    scene_a, frames_a = make_clip(seed, index)
    scene_b, frames_b = make_clip(seed, index)
    assert scene_a == scene_b
    assert frames_a.numpy().tobytes() == frames_b.numpy().tobytes()


def test_different_seeds_give_different_datasets():
    first = [frames.numpy().tobytes() for _, frames in iter_dataset(0, 4)]
    second = [frames.numpy().tobytes() for _, frames in iter_dataset(1, 4)]
    assert first == [frames.numpy().tobytes() for _, frames in iter_dataset(0, 4)]
    assert all(a != b for a, b in zip(first, second))


def test_clip_i_is_the_same_in_any_dataset_and_clips_differ():
    scenes = [scene for scene, _ in iter_dataset(2, 18)]
    assert scenes[:5] == [scene for scene, _ in iter_dataset(2, 5)]
    assert scenes[12] == make_clip(2, 12)[0]
    same_bucket = [(scenes[i], scenes[i + 9]) for i in range(9)]
    assert all(a.objects != b.objects for a, b in same_bucket)


def test_iter_dataset_streams_one_clip_at_a_time(monkeypatch):
    made = []
    real = shapes.make_clip
    monkeypatch.setattr(shapes, "make_clip", lambda seed, index, **kw: made.append(index) or real(seed, index, **kw))
    clips = iter_dataset(0, 10**9)  # far more than fit in memory
    next(clips)
    next(clips)
    assert made == [0, 1]


def test_buckets_are_cycled_evenly():
    buckets = [((s.width, s.height), s.frames) for s, _ in iter_dataset(5, 2 * len(shapes.BUCKETS))]
    expected = {(size, frames) for size in world.SIZES for frames in world.DURATIONS}
    assert set(buckets[: len(expected)]) == expected
    assert set(buckets[len(expected):]) == expected


# --- every scene keeps the promises of the module docstring --------------------------------


@given(seed=seeds, args=scene_args)
def test_scene_spec_invariants(seed, args):
    scene = sample_scene(np.random.default_rng(seed), **args)
    assert (scene.width, scene.height) == args["size"] and scene.frames == args["frames"]
    assert scene.fps == world.FPS and scene.background in world.BACKGROUNDS
    assert len(scene.objects) == args["objects"]
    shorter = min(scene.width, scene.height)
    for obj in scene.objects:
        assert obj["shape"] in world.SHAPES and obj["colour"] in world.COLOURS and obj["motion"] in world.MOTIONS
        smallest, largest = args["object_size"]
        assert smallest * shorter <= obj["size"] <= largest * shorter
        palette = np.array(world.COLOURS[obj["colour"]])
        assert np.abs(np.array(obj["rgb"]) - palette).max() <= 8  # ±8 per channel
        dx, dy = world.MOTIONS[obj["motion"]]
        moved = np.array(obj["end"]) - np.array(obj["start"])
        if (dx, dy) == (0, 0):
            assert moved.tolist() == [0, 0]
        else:
            axis = 0 if dx else 1
            length = (scene.width, scene.height)[axis]
            assert moved[1 - axis] == 0, "moves only along its axis"
            assert np.sign(moved[axis]) == (dx or dy), "in its direction"
            assert abs(moved[axis]) >= length * args["min_travel"], "travels at least min_travel of the frame"
    boxes = scene.boxes()  # (objects, T, 4)
    assert (boxes[..., :2] >= shapes.MARGIN).all()
    assert (boxes[..., 2] <= scene.width - shapes.MARGIN).all() and (boxes[..., 3] <= scene.height - shapes.MARGIN).all()
    if len(boxes) == 2:
        a, b = boxes
        apart_x = np.maximum(b[:, 0] - a[:, 2], a[:, 0] - b[:, 2])  # background columns between the boxes
        apart_y = np.maximum(b[:, 1] - a[:, 3], a[:, 1] - b[:, 3])
        assert (np.maximum(apart_x, apart_y) >= args["gap"]).all(), "gap pixels apart in every frame"
    held = [world.is_held_out(obj) for obj in scene.objects]
    if args["split"] == "train":
        assert not any(held)
    elif args["split"] == "heldout":
        assert any(held)


@given(seed=seeds, args=scene_args)
def test_rendered_pixels_match_the_spec(seed, args):
    scene = sample_scene(np.random.default_rng(seed), **args)
    frames = render(scene).numpy()
    assert frames.shape == (scene.frames, scene.height, scene.width, 3) and frames.dtype == np.uint8
    background = np.array(world.BACKGROUNDS[scene.background], dtype=np.uint8)
    is_background = (frames == background).all(-1)  # (T, H, W)
    # Nothing is ever cut off: the outermost rows and columns are background in every frame.
    assert is_background[:, [0, -1], :].all() and is_background[:, :, [0, -1]].all()
    first, last = 0, scene.frames - 1
    for index, obj in enumerate(scene.objects):
        masks = [object_pixels(frames, scene, index, t) for t in range(scene.frames)]
        areas = {int(m.sum()) for m in masks}
        assert len(areas) == 1 and areas.pop() > 0, "the same whole shape in every frame"
        side = obj["size"]
        fill = masks[0].sum() / side**2
        expected = {"square": (1.0, 1.0), "circle": (0.70, 0.86), "triangle": (0.40, 0.60)}[obj["shape"]]
        assert expected[0] <= fill <= expected[1], f"{obj['shape']} fills {fill:.2f} of its box"
        ys, xs = np.nonzero(masks[first])
        ye, xe = np.nonzero(masks[last])
        shift = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])
        dx, dy = world.MOTIONS[obj["motion"]]
        if (dx, dy) == (0, 0):
            assert np.allclose(shift, 0)
        else:
            axis = 0 if dx else 1
            assert shift[axis] * (dx or dy) >= (scene.width, scene.height)[axis] * args["min_travel"]
    # Everything that is not background belongs to an object's box.
    covered = np.zeros_like(is_background)
    for t in range(scene.frames):
        for x0, y0, x1, y1 in scene.boxes()[:, t]:
            covered[t, y0:y1, x0:x1] = True
    assert (is_background | covered).all()


@given(seed=seeds)
def test_the_default_share_of_two_object_clips_draws_as_before_the_option(seed):
    # Before two_objects, rng.integers(1, 3) chose 1 or 2 objects; the default must draw the same
    # number and leave the generator where that draw did, so earlier datasets keep their clips.
    before, now = np.random.default_rng(seed), np.random.default_rng(seed)
    objects = int(before.integers(1, 3))
    before_scene = sample_scene(before, size=(64, 64), frames=9, objects=objects)
    assert sample_scene(now, size=(64, 64), frames=9) == before_scene


@pytest.mark.parametrize("two_objects, low, high", [(0, 0, 0), (0.25, 0.15, 0.35), (0.75, 0.65, 0.85), (1, 1, 1)])
def test_two_objects_is_the_share_of_clips_with_two_objects(two_objects, low, high):
    counts = [len(scene.objects) for scene, _ in iter_dataset(4, 200, split="all", two_objects=two_objects)]
    assert set(counts) <= {1, 2}
    assert low <= counts.count(2) / len(counts) <= high


@given(seed=seeds)
def test_train_split_never_and_heldout_split_always_holds_a_held_out_object(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        assert not any(world.is_held_out(o) for o in sample_scene(rng, split="train").objects)
        assert any(world.is_held_out(o) for o in sample_scene(rng, split="heldout").objects)


def test_split_all_draws_held_out_objects_too():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, split="all") for _ in range(300)]
    assert any(world.is_held_out(o) for s in scenes for o in s.objects)
    assert any(not world.is_held_out(o) for s in scenes for o in s.objects)


# --- writing -------------------------------------------------------------------------------------


def test_write_dataset_writes_clips_matching_the_manifest(tmp_path):
    manifest = write_dataset(tmp_path / "data", seed=3, count=4)
    assert manifest == tmp_path / "data" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "data" / "clips").iterdir()) == [f"{i:06d}.mp4" for i in range(4)]
    for record, (scene, truth) in zip(records, iter_dataset(3, 4)):
        assert set(record) == {
            "id", "path", "width", "height", "frames", "fps", "background", "objects", "split", "seed", "min_travel",
            "object_size", "gap", "two_objects",
        }
        assert record["split"] == "train" and record["seed"] == 3 and record["min_travel"] == 0.25
        assert record["object_size"] == [0.2, 0.3] and record["gap"] == 1 and record["two_objects"] == 0.5
        assert record["objects"] == json.loads(json.dumps(shapes.clip_record(scene, record["id"], split="train", seed=3)["objects"]))
        frames, fps = read_video(tmp_path / "data" / record["path"])
        assert b" mbtree=0 " in (tmp_path / "data" / record["path"]).read_bytes()  # written reproducibly
        assert frames.shape == (record["frames"], record["height"], record["width"], 3)
        assert fps == pytest.approx(record["fps"])
        assert ((record["width"], record["height"]), record["frames"]) in shapes.BUCKETS
        # The file shows the ground truth (up to H.264 at crf 18).
        assert (frames.float() - truth.float()).abs().mean() < 4


def test_resume_after_an_interruption_equals_one_uninterrupted_run(tmp_path, monkeypatch):
    whole = write_dataset(tmp_path / "whole", seed=7, count=5, split="all")

    real = shapes.write_video
    def interrupt_on_fourth(path, *args, **kwargs):
        if path.name == "000003.mp4":
            # What a hard kill (no cleanup) would leave: every finished clip is already on disk.
            on_disk = (tmp_path / "cut" / "manifest.jsonl").read_text().splitlines()
            assert [json.loads(line)["id"] for line in on_disk] == [0, 1, 2]
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shapes, "write_video", interrupt_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "cut", seed=7, count=5, split="all")
    monkeypatch.setattr(shapes, "write_video", real)
    cut = tmp_path / "cut" / "manifest.jsonl"
    assert len(read_manifest(cut)) == 3
    with open(cut, "a") as lines:  # a line the interrupted run had only half written
        lines.write('{"id": 3, "pa')
    assert len(read_manifest(cut)) == 3

    with pytest.raises(DatasetError, match="not empty; pass resume=True"):
        write_dataset(tmp_path / "cut", seed=7, count=5, split="all")
    with pytest.raises(DatasetError, match=r"seed 7, split 'all', min_travel 0.25, object_size \[0.2, 0.3\], gap 1 and two_objects 0.5, not seed 8"):
        write_dataset(tmp_path / "cut", seed=8, count=5, split="all", resume=True)
    with pytest.raises(DatasetError, match="min_travel 0.25, .*, not seed 7, split 'all', min_travel 0.5,"):
        write_dataset(tmp_path / "cut", seed=7, count=5, split="all", resume=True, min_travel=0.5)
    with pytest.raises(DatasetError, match=r"object_size \[0.2, 0.3\], gap 1 and .*, not .*, object_size \[0.3, 0.4\], gap 1 and"):
        write_dataset(tmp_path / "cut", seed=7, count=5, split="all", resume=True, object_size=(0.3, 0.4))
    with pytest.raises(DatasetError, match=r", gap 1 and .*, not .*, gap 4 and two_objects 0.5; use those"):
        write_dataset(tmp_path / "cut", seed=7, count=5, split="all", resume=True, gap=4)
    with pytest.raises(DatasetError, match=r"and two_objects 0.5, not .* and two_objects 0.75; use those"):
        write_dataset(tmp_path / "cut", seed=7, count=5, split="all", resume=True, two_objects=0.75)
    kept = {p.name: p.read_bytes() for p in (tmp_path / "cut" / "clips").iterdir()}
    assert sorted(kept) == ["000000.mp4", "000001.mp4", "000002.mp4"]  # no partial clip left behind
    write_dataset(tmp_path / "cut", seed=7, count=5, split="all", resume=True)
    assert cut.read_text() == whole.read_text()
    assert all((tmp_path / "cut" / "clips" / name).read_bytes() == data for name, data in kept.items())
    # Clips are written reproducibly, so the resumed run's files are the uninterrupted run's.
    for record, (_, truth) in zip(read_manifest(whole), iter_dataset(7, 5, split="all")):
        assert (tmp_path / "cut" / record["path"]).read_bytes() == (tmp_path / "whole" / record["path"]).read_bytes()
        frames, _ = read_video(tmp_path / "whole" / record["path"])
        assert frames.shape == truth.shape and (frames.float() - truth.float()).abs().mean() < 4


def test_workers_write_the_same_files(tmp_path):
    one = write_dataset(tmp_path / "one", seed=5, count=40, split="all")
    two = write_dataset(tmp_path / "two", seed=5, count=40, split="all", workers=2)  # 3 chunks of clips
    assert two.read_text() == one.read_text()
    for record in read_manifest(one):
        assert (tmp_path / "two" / record["path"]).read_bytes() == (tmp_path / "one" / record["path"]).read_bytes()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: write_dataset(d, 0, 0), "count must be an integer >= 1, got 0"),
        (lambda d: write_dataset(d, 0, 2, workers=0), "workers must be a whole number of processes, at least 1, got 0"),
        (lambda d: write_dataset(d, 0, 2, gap=0), "gap must be a whole number of pixels from 1 to 8 .*got 0"),
        (lambda d: iter_dataset(0, 2, gap=2.5), "gap must be a whole number of pixels from 1 to 8 .*got 2.5"),
        (lambda d: write_dataset(d, 0, 2, split="dev"), "unknown split 'dev'; valid splits: train, heldout, all"),
        (lambda d: write_dataset(d, -1, 2), "seed must be an integer >= 0, got -1"),
        (lambda d: write_dataset(d, 0, 2, crf=99), r"crf must be an integer in \[0, 51\], got 99"),
        (lambda d: iter_dataset(0, -5), "count must be an integer >= 1, got -5"),
        (lambda d: sample_scene(np.random.default_rng(0), size=(10, 10)), r"size \(10, 10\) is not a bucket; valid \(width, height\): 64x64, 80x48, 48x80"),
        (lambda d: sample_scene(np.random.default_rng(0), frames=10), "frames 10 is not a bucket; valid: 9, 17, 33"),
        (lambda d: sample_scene(np.random.default_rng(0), objects=3), "objects must be 1 or 2, got 3"),
        (lambda d: write_dataset(d, 0, 2, two_objects=1.5), "two_objects must be a number from 0 to 1 .*got 1.5"),
        (lambda d: sample_scene(np.random.default_rng(0), two_objects=True), "two_objects must be a number from 0 to 1 .*got True"),
        (lambda d: write_dataset(d, 0, 2, min_travel=0.1), "min_travel must be a number from 0.25 to 0.6 .*got 0.1"),
        (lambda d: iter_dataset(0, 2, min_travel="half"), "min_travel must be a number from 0.25 to 0.6 .*got 'half'"),
        (lambda d: write_dataset(d, 0, 2, object_size=(0.3, 0.2)),
         r"object_size must be two numbers \[smallest, largest\] with 0.15 <= smallest <= largest <= 0.4 .*got \(0.3, 0.2\)"),
        (lambda d: iter_dataset(0, 2, object_size=0.3), r"object_size must be two numbers .*got 0.3"),
        (lambda d: write_dataset(d, 0, 2, object_size=(0.33, 0.33)),
         r"object_size \[0.33, 0.33\] holds no whole-pixel side in a 64x64 frame \(21.12 to 21.12 pixels\); widen it"),
        (lambda d: write_dataset(d, 0, 2, min_travel=0.6, object_size=(0.3, 0.4)),
         r"object_size \[0.3, 0.4\]: a 25px object cannot travel min_travel 0.6 of a 64x64 frame; lower the largest"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(tmp_path, call, message):
    with pytest.raises(DatasetError, match=message):
        call(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_non_empty_directory_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="is not empty"):
        write_dataset(tmp_path, 0, 1)
    with pytest.raises(DatasetError, match="has no manifest.jsonl"):
        write_dataset(tmp_path, 0, 1, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- command -------------------------------------------------------------------------------------


def test_shapes_command(tmp_path):
    out = tmp_path / "data"
    runner = CliRunner()
    result = runner.invoke(shapes_command, [str(out), "--count", "2", "--seed", "4", "--split", "heldout"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 2 clips (2 in all, split heldout, seed 4) to ")
    assert len(result.output.strip().splitlines()) == 1
    records = read_manifest(out)
    assert [r["id"] for r in records] == [0, 1] and all(r["split"] == "heldout" for r in records)

    again = runner.invoke(shapes_command, [str(out), "--count", "3", "--seed", "4", "--split", "heldout"])
    assert again.exit_code == 1 and "is not empty" in again.output
    resumed = runner.invoke(shapes_command, [str(out), "--count", "3", "--seed", "4", "--split", "heldout", "--resume"])
    assert resumed.exit_code == 0 and resumed.output.startswith("wrote 1 clips (3 in all")
    assert [r["id"] for r in read_manifest(out)] == [0, 1, 2]

    bad = runner.invoke(shapes_command, [str(tmp_path / "other"), "--count", "0"])
    assert bad.exit_code == 1 and "error: count must be an integer >= 1, got 0" in bad.output
    bad_split = runner.invoke(shapes_command, [str(tmp_path / "other"), "--split", "dev"])
    assert bad_split.exit_code == 2 and "'dev' is not one of" in bad_split.output

    edge = tmp_path / "edge"
    far = runner.invoke(shapes_command, [str(edge), "--count", "2", "--min-travel", "0.5"])
    assert far.exit_code == 0, far.output
    assert [r["min_travel"] for r in read_manifest(edge)] == [0.5, 0.5]
    mixed = runner.invoke(shapes_command, [str(edge), "--count", "3", "--resume"])
    assert mixed.exit_code == 1 and "min_travel 0.5, object_size [0.2, 0.3], gap 1 and two_objects 0.5, not seed 0, split 'train', min_travel 0.25" in mixed.output
    too_far = runner.invoke(shapes_command, [str(tmp_path / "other"), "--min-travel", "0.9"])
    assert too_far.exit_code == 2 and "0.9 is not in the range 0.25<=x<=0.6" in too_far.output

    big = tmp_path / "big"
    larger = runner.invoke(shapes_command, [str(big), "--count", "9", "--object-size", "0.3", "0.4"])
    assert larger.exit_code == 0, larger.output
    for record in read_manifest(big):
        assert record["object_size"] == [0.3, 0.4]
        shorter = min(record["width"], record["height"])
        assert all(0.3 * shorter <= obj["size"] <= 0.4 * shorter for obj in record["objects"])
    smaller = runner.invoke(shapes_command, [str(big), "--count", "10", "--resume"])
    assert smaller.exit_code == 1 and "object_size [0.3, 0.4], gap 1 and two_objects 0.5, not seed 0" in smaller.output

    spaced = tmp_path / "spaced"
    wide = runner.invoke(shapes_command, [str(spaced), "--count", "18", "--gap", "6", "--object-size", "0.3", "0.4"])
    assert wide.exit_code == 0, wide.output
    assert {r["gap"] for r in read_manifest(spaced)} == {6}
    pairs = tmp_path / "pairs"
    all_pairs = runner.invoke(shapes_command, [str(pairs), "--count", "9", "--two-objects", "1"])
    assert all_pairs.exit_code == 0, all_pairs.output
    assert [(r["two_objects"], len(r["objects"])) for r in read_manifest(pairs)] == [(1.0, 2)] * 9
    too_many = runner.invoke(shapes_command, [str(tmp_path / "other"), "--two-objects", "1.2"])
    assert too_many.exit_code == 2 and "1.2 is not in the range 0<=x<=1" in too_many.output
    too_wide = runner.invoke(shapes_command, [str(tmp_path / "other"), "--gap", "9"])
    assert too_wide.exit_code == 2 and "9 is not in the range 1<=x<=8" in too_wide.output
    too_big = runner.invoke(shapes_command, [str(tmp_path / "other"), "--object-size", "0.3", "0.5"])
    assert too_big.exit_code == 1 and "error: object_size must be two numbers" in too_big.output
    assert not (tmp_path / "other").exists()


def test_shapes_command_interrupted_says_how_to_continue(tmp_path, monkeypatch):
    real = shapes.write_video

    def interrupt_on_second(path, *args, **kwargs):
        if path.name == "000001.mp4":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shapes, "write_video", interrupt_on_second)
    result = CliRunner().invoke(shapes_command, [str(tmp_path / "data"), "--count", "3"])
    assert result.exit_code == 130
    assert "interrupted: 1 clips are complete" in result.output and "--resume" in result.output
    monkeypatch.setattr(shapes, "write_video", real)
    resumed = CliRunner().invoke(shapes_command, [str(tmp_path / "data"), "--count", "3", "--resume"])
    assert resumed.exit_code == 0 and resumed.output.startswith("wrote 2 clips (3 in all")


def test_recaptioning_written_clips_recovers_the_ground_truth(tmp_path):
    # The analyser behind the `shapes` captioner reads what the generator drew, through H.264.
    from benchmarks.eval_captioner import evaluate

    groups = evaluate(tmp_path / "data", count=18, split="all", seed=3, two_objects=0.75, gap=4)
    scenes_right, scenes, figures = groups["all"]
    assert scenes == 18 and scenes_right >= 17
    assert sum(groups[g][1] for g in groups if g.startswith(("one", "two"))) == 18  # each clip in one group
    assert groups["one object"][1] < 9  # three clips in four hold two objects
    for name in ("shape", "colour", "motion", "background"):
        right, total = figures[name]
        assert right / total >= 0.95, (name, figures)
