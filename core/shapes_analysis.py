"""Reads a shapes-world clip from its pixels: background, objects, their shape, colour and motion.

Shared by the `shapes` captioner (re-captioning, as Sora's recipe does) and the evaluation,
so that a caption and a score come from one reading of the video. Pixels only: nothing is
taken from the file name or the dataset's metadata.

How it reads a clip (T, H, W, 3) uint8:
1. background: per frame, the mode of the border pixels (coarse 16-level bins, then the mean
   of the pixels in the winning bin, so codec noise does not split the mode); named after
   the nearest BACKGROUNDS entry;
2. foreground: pixels more than FOREGROUND_DISTANCE (RGB) from the frame's background,
   connected components (scipy.ndimage.label), components under MIN_AREA pixels are specks;
3. tracking: detections are matched to tracks by the Hungarian algorithm on centroid distance
   plus colour distance, with a gate, so two objects keep their identities;
4. per object: colour = nearest COLOURS entry in CIE Lab to the median RGB of its core pixels
   (those far from the background, so blurred edges do not pull the colour towards it);
   shape = bounding-box fill ratio (square 1, circle π/4, triangle 1/2) measured with
   sub-pixel "soft" coverage, robust to blur and to 10-pixel objects, with the second-moment
   invariant (var x + var y) / area as the tie-breaker near a boundary; square or circle is
   then decided by the fill together with the corner occupancy (how much of the box outside
   its inscribed ellipse is covered: a circle 0, a square 1), so a square drawn with bowed
   sides and soft corners is still a square; motion = the centroid's
   displacement from the first to the last frame it is seen in, relative to the frame's
   sides: under MOTION_THRESHOLD it "stays still", else the dominant axis names it.
Objects of different colours that touch or overlap are split by colour (each pixel joins the
nearest pixel of a clearly present palette colour); frames where an object is split off or
clipped by the frame's edge do not vote on its shape. Touching objects of one colour merge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from skyloom.shapes_world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES
from skyloom.video_io import as_frames

FOREGROUND_DISTANCE = 48.0  # RGB distance from the background above which a pixel is an object's
MIN_AREA = 8  # components smaller than this (pixels) are specks: codec ringing, noise
MOTION_THRESHOLD = 0.08  # |displacement| / side under which an object "stays still"
MIN_PERSISTENCE = 0.3  # tracks seen in fewer frames than this fraction are dropped
SPLIT_SHARE = 0.25  # a second colour holding this share of a component's pixels splits it
TRACK_GATE = 0.35  # a detection further than this fraction of the diagonal starts a new track
MIN_BACKGROUND_SHARE = 0.25  # flicker: a frame pair with less background than this is measured whole

# Fill ratio of the bounding box: square 1, circle π/4, triangle 1/2; boundaries between them.
# Measured on 10-18 px shapes (tests' clips): clean circles 0.77-0.81, triangles 0.50-0.58,
# squares 1.0; after H.264 CRF 23 circles 0.76-0.83, squares >= 0.977, and triangles up to
# 0.69 (0.74 at worst): 4:2:0 chroma blurs the apex of a colour that differs from the
# background mostly in chroma (purple or green on gray), so the triangle boundary sits high.
FILL_REFERENCE = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
SQUARE_CIRCLE_FILL = 0.9
CIRCLE_TRIANGLE_FILL = 0.725
# (var x + var y) / area of each shape (scale invariant): the tie-breaker near a boundary.
MOMENT_REFERENCE = {"square": 1 / 6, "circle": 1 / (2 * math.pi), "triangle": 7 / 36}
TIE_MARGIN = 0.03
# Square or circle from (fill, corner occupancy): the nearer of the two shapes' mean values,
# in units of the features' spread. Means and spreads were measured on shapes whose truth is
# known, blurred as a generator blurs them: 180 dataset clips (seed 7, every size and duration)
# through the embedded model's autoencoder (docs/performance.md, "The analyser under-read
# squares"). Drawn clean, a circle is (0.79, 0) and a square (1, 1).
SQUARE_CIRCLE_CENTROIDS = {"square": (0.922, 0.552), "circle": (0.806, 0.159)}
SQUARE_CIRCLE_SPREAD = (0.0233, 0.1043)  # the two shapes' pooled standard deviations
# A box corner is the box outside its inscribed ellipse by this much (normalised radius²), so
# that the soft rim of a blurred circle does not count as corner.
CORNER_RADIUS2 = 1.2


@dataclass(frozen=True)
class ObjectAnalysis:
    """One tracked object. Confidences are in [0, 1]: 0 on a decision boundary, 1 far from it."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    motion: str  # one of MOTIONS, e.g. "moves left"
    persistence: float  # fraction of the frames the object was found in
    shape_confidence: float
    colour_confidence: float
    motion_confidence: float
    rgb: tuple[int, int, int]  # median sRGB of its core pixels
    fill_ratio: float  # median soft area / bounding-box area
    corner_occupancy: float | None  # median corner_occupancy; None where no frame's box has corners
    displacement: tuple[float, float]  # (dx / W, dy / H), first to last frame seen
    size: float  # median sqrt(area) in pixels
    track: tuple[tuple[int, float, float], ...] = field(repr=False)  # (frame, x, y) centroids

    @property
    def attributes(self) -> dict:
        """{shape, colour, motion}: the words a caption states, comparable with a dataset record."""
        return {"shape": self.shape, "colour": self.colour, "motion": self.motion}


@dataclass(frozen=True)
class VideoAnalysis:
    background: str  # one of BACKGROUNDS
    background_rgb: tuple[int, int, int]  # mean estimated background colour
    background_confidence: float
    objects: tuple[ObjectAnalysis, ...]  # ordered by first position, left to right, top to bottom
    flicker: float  # mean |frame-to-frame difference| of background pixels, in 0..255 levels
    frames: int
    height: int
    width: int
    fps: float

    def as_dict(self) -> dict:
        record = asdict(self)
        for obj in record["objects"]:
            obj.pop("track")
        return record


# --- colour ------------------------------------------------------------------------------


def srgb_to_lab(rgb) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> (..., 3) CIE Lab (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920], [0.1804375, 0.0721750, 0.9503041]]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def nearest_name(rgb, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    """The palette name nearest `rgb` in Lab, and a confidence 1 - d_nearest / d_second."""
    names = list(palette)
    distances = np.linalg.norm(srgb_to_lab([palette[n] for n in names]) - srgb_to_lab(rgb), axis=-1)
    order = np.argsort(distances)
    if len(names) == 1:
        return names[0], 1.0
    nearest, second = distances[order[0]], distances[order[1]]
    return names[order[0]], float(1.0 - nearest / max(second, 1e-9))


# --- per frame ---------------------------------------------------------------------------


def _border(frame: np.ndarray) -> np.ndarray:
    return np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]]).astype(np.int64)


def _background_colour(frame: np.ndarray) -> np.ndarray:
    pixels = _border(frame)
    bins = pixels // 16
    keys = (bins[:, 0] << 8) | (bins[:, 1] << 4) | bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    mode = values[np.argmax(counts)]
    return pixels[keys == mode].mean(axis=0)


def _split_by_colour(labels: np.ndarray, pixels: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, set]:
    """Relabel components in which two objects of different colours touch: each palette colour
    that holds at least SPLIT_SHARE of the component's strong pixels seeds a part, and every
    pixel of the component joins the part of its nearest seed. Returns the new labels and the
    set of labels that came from a split (their masks are occluded, so their shape is not)."""
    palette = srgb_to_lab(list(COLOURS.values()))
    out, next_label, split = labels.copy(), labels.max() + 1, set()
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == k
        strong = inside & (distance[box] > 2 * FOREGROUND_DISTANCE)  # well inside an object
        if strong.sum() < 2 * MIN_AREA:
            continue
        lab = srgb_to_lab(pixels[box][strong])
        nearest = np.argmin(np.linalg.norm(lab[:, None, :] - palette[None], axis=-1), axis=1)
        classes = np.full(inside.shape, -1)
        classes[strong] = nearest
        # Count each colour's pixels after a one-pixel erosion: a codec-tinted rim around one
        # object (yellow's rim reads white after 4:2:0) vanishes, a second object does not.
        counts = np.array([ndimage.binary_erosion(classes == c).sum() for c in range(len(palette))])
        parts = [c for c in np.argsort(-counts) if counts[c] >= max(MIN_AREA, SPLIT_SHARE * counts.sum())]
        if len(parts) < 2:
            continue
        seeds = np.zeros(inside.shape, np.int64)
        seeds[strong] = np.where(np.isin(nearest, parts), nearest + 1, 0)
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        owner = seeds[iy, ix]  # (h, w): palette index + 1 of the nearest seed
        region = out[box]
        split.add(k)
        for part in parts[1:]:
            region[inside & (owner == part + 1)] = next_label
            split.add(next_label)
            next_label += 1
    return out, split


@dataclass
class _Detection:
    frame: int
    x: float  # soft-coverage centroid, pixels
    y: float
    rgb: np.ndarray  # median RGB of core pixels
    fill: float
    moment: float
    corners: float | None  # corner_occupancy; None for a box too small to have corners
    area: float
    partial: bool  # clipped by the frame's edge, or touching another object: its mask lies about shape


def _detect(frame: np.ndarray, background: np.ndarray, index: int) -> list[_Detection]:
    height, width, _ = frame.shape
    pixels = frame.astype(np.float64)
    offset = pixels - background  # (H, W, 3)
    distance = np.linalg.norm(offset, axis=-1)
    labels, split = _split_by_colour(ndimage.label(distance > FOREGROUND_DISTANCE)[0], pixels, distance)
    detections = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == k
        if inside.sum() < MIN_AREA:
            continue
        # Pad the box by two pixels: blurred edges below the threshold still carry coverage.
        y0, y1 = max(box[0].start - 2, 0), min(box[0].stop + 2, height)
        x0, x1 = max(box[1].start - 2, 0), min(box[1].stop + 2, width)
        d = distance[box][inside]
        core = d >= 0.7 * d.max()
        rgb = np.median(pixels[box][inside][core], axis=0)
        direction = rgb - background
        norm2 = float(direction @ direction)
        # Soft coverage alpha: the pixel's position between background (0) and object colour (1).
        alpha = np.clip(offset[y0:y1, x0:x1] @ direction / norm2, 0.0, 1.0)
        near = ndimage.binary_dilation(labels[y0:y1, x0:x1] == k, iterations=2)
        alpha = np.where(near & (alpha > 0.1), alpha, 0.0)
        area = float(alpha.sum())
        # Soft extents: a column is covered as much as its most covered pixel.
        extent_x = float(alpha.max(axis=0).sum())
        extent_y = float(alpha.max(axis=1).sum())
        ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
        cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
        moment = float((alpha * ((xs - cx) ** 2 + (ys - cy) ** 2)).sum() / area**2)
        corners = corner_occupancy(alpha)
        clipped = box[0].start == 0 or box[1].start == 0 or box[0].stop == height or box[1].stop == width
        detections.append(
            _Detection(index, cx, cy, rgb, area / max(extent_x * extent_y, 1e-9), moment, corners, area, clipped or k in split)
        )
    return detections


# --- shape and motion --------------------------------------------------------------------


def corner_occupancy(alpha: np.ndarray) -> float | None:
    """Mean coverage of the corners of a shape's box: the part outside the inscribed ellipse by
    CORNER_RADIUS2. alpha: soft coverage in [0, 1] around one shape; its box is the rows and
    columns covered more than half. Circle 0, square 1, triangle about 1/3; None when no pixel
    centre lies outside that line (a box under 5 pixels both ways) or nothing is covered."""
    rows, cols = np.flatnonzero(alpha.max(axis=1) > 0.5), np.flatnonzero(alpha.max(axis=0) > 0.5)
    if len(rows) == 0 or len(cols) == 0:
        return None
    box = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = box.shape
    v, u = np.mgrid[0:height, 0:width] + 0.5
    corner = (2 * u / width - 1) ** 2 + (2 * v / height - 1) ** 2 > CORNER_RADIUS2
    return float(box[corner].mean()) if corner.any() else None


def classify_shape(fill: float, moment: float, corners: float | None = None) -> tuple[str, float]:
    """Shape from the bounding-box fill ratio, with the moment invariant deciding near a boundary.
    With a corner occupancy (corners), a shape that is not a triangle by that rule is the nearer
    of SQUARE_CIRCLE_CENTROIDS in (fill, corners)."""
    if fill > SQUARE_CIRCLE_FILL:
        shape, boundary, pair = "square", SQUARE_CIRCLE_FILL, ("square", "circle")
    elif fill > CIRCLE_TRIANGLE_FILL:
        near_square = fill - SQUARE_CIRCLE_FILL > CIRCLE_TRIANGLE_FILL - fill
        boundary = SQUARE_CIRCLE_FILL if near_square else CIRCLE_TRIANGLE_FILL
        shape, pair = "circle", (("square", "circle") if near_square else ("circle", "triangle"))
    else:
        shape, boundary, pair = "triangle", CIRCLE_TRIANGLE_FILL, ("circle", "triangle")
    margin = abs(fill - boundary)
    if margin < TIE_MARGIN:
        shape = min(pair, key=lambda s: abs(moment - MOMENT_REFERENCE[s]))
    if shape != "triangle" and corners is not None:
        distance = {
            name: math.hypot((fill - f) / SQUARE_CIRCLE_SPREAD[0], (corners - c) / SQUARE_CIRCLE_SPREAD[1])
            for name, (f, c) in SQUARE_CIRCLE_CENTROIDS.items()
        }
        shape = min(distance, key=distance.get)
        if pair == ("square", "circle"):  # two spreads between the distances is "far from the boundary"
            return shape, float(min(abs(distance["square"] - distance["circle"]) / 2, 1.0))
    # Half the gap between neighbouring references counts as "far from the boundary".
    return shape, float(min(margin / 0.1, 1.0))


def classify_motion(dx: float, dy: float) -> tuple[str, float]:
    """Motion name from a displacement relative to the frame's sides (dx / W, dy / H)."""
    magnitude = math.hypot(dx, dy)
    if magnitude < MOTION_THRESHOLD:
        return "stays still", float(1.0 - magnitude / MOTION_THRESHOLD)
    unit = (dx / magnitude, dy / magnitude)
    scores = {name: unit[0] * v[0] + unit[1] * v[1] for name, v in MOTIONS.items() if v != (0, 0)}
    name = max(scores, key=scores.get)
    # Confidence: how far past the threshold, times how clearly one axis dominates.
    axis = abs(abs(unit[0]) - abs(unit[1]))
    return name, float(min(magnitude / MOTION_THRESHOLD - 1.0, 1.0) * axis)


# --- tracking ----------------------------------------------------------------------------


def _track(per_frame: list[list[_Detection]], diagonal: float) -> list[list[_Detection]]:
    tracks: list[list[_Detection]] = []
    for detections in per_frame:
        if not detections:
            continue
        if tracks:
            cost = np.array(
                [
                    [
                        math.hypot(d.x - t[-1].x, d.y - t[-1].y) / diagonal
                        + float(np.linalg.norm(d.rgb - t[-1].rgb)) / 441.7
                        for d in detections
                    ]
                    for t in tracks
                ]
            )
            rows, cols = linear_sum_assignment(cost)
        else:
            rows, cols = np.array([], int), np.array([], int)
        matched = set()
        for r, c in zip(rows, cols):
            if cost[r, c] <= TRACK_GATE + 0.25:
                tracks[r].append(detections[c])
                matched.add(c)
        tracks.extend([d] for i, d in enumerate(detections) if i not in matched)
    return tracks


def _describe(track: list[_Detection], frames: int, height: int, width: int) -> ObjectAnalysis:
    rgb = np.median(np.stack([d.rgb for d in track]), axis=0)
    colour, colour_confidence = nearest_name(rgb, COLOURS)
    whole = [d for d in track if not d.partial] or track
    fill = float(np.median([d.fill for d in whole]))
    moment = float(np.median([d.moment for d in whole]))
    measured = [d.corners for d in whole if d.corners is not None]
    corners = float(np.median(measured)) if measured else None
    shape, shape_confidence = classify_shape(fill, moment, corners)
    dx, dy = (track[-1].x - track[0].x) / width, (track[-1].y - track[0].y) / height
    motion, motion_confidence = classify_motion(dx, dy)
    return ObjectAnalysis(
        shape=shape,
        colour=colour,
        motion=motion,
        persistence=len({d.frame for d in track}) / frames,
        shape_confidence=shape_confidence,
        colour_confidence=colour_confidence,
        motion_confidence=motion_confidence,
        rgb=tuple(int(round(v)) for v in rgb),
        fill_ratio=fill,
        corner_occupancy=corners,
        displacement=(float(dx), float(dy)),
        size=float(np.median([math.sqrt(d.area) for d in track])),
        track=tuple((d.frame, d.x, d.y) for d in track),
    )


# --- entry point -------------------------------------------------------------------------


def analyse(frames, fps: float) -> VideoAnalysis:
    """Read a shapes-world clip, (T, H, W, 3) uint8 tensor or array, from its pixels alone.

    Raises ValueError for the wrong dtype, rank or channel count, or a frame smaller than
    3 x 3 pixels (it has no border to find the background in).
    """
    array = as_frames(frames)
    count, height, width, _ = array.shape
    if height < 3 or width < 3:
        raise ValueError(f"frames must be at least 3 x 3 pixels to have a border, got {height} x {width}")
    backgrounds = np.stack([_background_colour(f) for f in array])  # (T, 3)
    per_frame = [_detect(f, b, i) for i, (f, b) in enumerate(zip(array, backgrounds))]
    tracks = _track(per_frame, math.hypot(height, width))
    objects = [_describe(t, count, height, width) for t in tracks]
    objects = [o for o in objects if o.persistence >= MIN_PERSISTENCE]
    objects.sort(key=lambda o: (round(o.track[0][1] / width, 2), o.track[0][2]))
    background_rgb = backgrounds.mean(axis=0)
    background, background_confidence = nearest_name(background_rgb, BACKGROUNDS)
    return VideoAnalysis(
        background=background,
        background_rgb=tuple(int(round(v)) for v in background_rgb),
        background_confidence=background_confidence,
        objects=tuple(objects),
        flicker=_flicker(array, backgrounds),
        frames=count,
        height=height,
        width=width,
        fps=float(fps),
    )


def _flicker(array: np.ndarray, backgrounds: np.ndarray) -> float:
    """Mean |frame-to-frame difference| over pixels that are background in both frames. A pair
    of frames with under MIN_BACKGROUND_SHARE of its pixels background (noise, as an untrained
    model draws) has no background to measure: its whole frame counts, so noise is not "steady"."""
    if len(array) < 2:
        return 0.0
    pixels = array.astype(np.float64)
    far = np.linalg.norm(pixels - backgrounds[:, None, None, :], axis=-1) > FOREGROUND_DISTANCE / 2
    differences = []
    for t in range(1, len(array)):
        keep = ~ndimage.binary_dilation(far[t] | far[t - 1], iterations=2)
        if keep.mean() < MIN_BACKGROUND_SHARE:
            keep[:] = True
        differences.append(np.abs(pixels[t] - pixels[t - 1])[keep].mean())
    return float(np.mean(differences))


# --- words -------------------------------------------------------------------------------


def canonical_caption(objects, background: str | None) -> str:
    """The canonical caption, e.g. "A red circle moves left while a blue square stays still on a
    gray background." `objects` are dicts (or ObjectAnalysis) with shape, colour and motion, any
    of which may be None and is then left out; `background` None leaves the background out.
    The `shapes` captioner's first phrasing is this one; the `caption-style` enhancer writes it."""
    clauses = []
    for obj in objects:
        attributes = obj.attributes if isinstance(obj, ObjectAnalysis) else obj
        noun = " ".join(w for w in (attributes.get("colour"), attributes.get("shape") or "shape") if w)
        clause = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
        if attributes.get("motion"):
            clause += f" {attributes['motion']}"
        clauses.append(clause)
    if not clauses:
        text = f"an empty {background} background" if background else "an empty scene"
    else:
        text = " while ".join(clauses) + (f" on a {background} background" if background else "")
    return text[0].upper() + text[1:] + "."


assert set(MOMENT_REFERENCE) == set(FILL_REFERENCE) == set(SHAPES)
