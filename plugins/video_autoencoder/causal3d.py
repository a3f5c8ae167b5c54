"""causal3d: a small causal 3D convolutional video autoencoder, cheap enough to train on a CPU.

Pixels go through space-to-depth (pixel-unshuffle) first, so every 3D convolution runs at low
resolution. Convolutions are causal in time: each is padded only with past frames (the first
frame replicated), and temporal downsampling is a stride-2 causal convolution. So latent frame
0 depends on pixel frame 0 alone (a still image is a one-frame video), and T = 1 + k·ct frames
map to 1 + k latent frames. The decoder mirrors the encoder with depth-to-space/time.

Because every layer is causal in time and the norms are per frame, the decoder can run on a few
latent frames at a time, carrying each convolution's last input frames to the next chunk
(`iter_decode`): long videos never hold every frame's activations at once. `decode` can also
tile space with overlapping, linearly blended tiles; each tile is normalised over its own
pixels, so a tiled decode approximates the whole one (for frames too large to decode at once).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from skyloom.hookspecs import hookimpl
from skyloom.kinds import VideoAutoencoder


@dataclass
class Causal3DConfig:
    in_channels: int = 3  # RGB
    latent_channels: int = 8  # C' of the latent video
    spatial_compression: int = 8  # H/H' = W/W' = patch_size · 2^(spatial downsamplings)
    temporal_compression: int = 4  # (T-1)/(T'-1) = 2^(temporal downsamplings)
    patch_size: int = 4  # space-to-depth factor applied to the pixels before any convolution
    widths: tuple[int, ...] = (32, 64, 128)  # channels per level; len(widths)-1 downsampling stages
    num_res_blocks: int = 1  # residual blocks per level
    scaling_factor: float = 1.0  # encode() returns (mean - shift_factor) · scaling_factor
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        stages = len(self.widths) - 1
        if self.spatial_compression % self.patch_size:
            raise ValueError(
                f"spatial_compression ({self.spatial_compression}) must be a multiple of patch_size ({self.patch_size})"
            )
        down_s = math.log2(self.spatial_compression // self.patch_size)
        down_t = math.log2(self.temporal_compression)
        for name, downs in (("spatial_compression/patch_size", down_s), ("temporal_compression", down_t)):
            if downs != int(downs) or downs > stages:
                raise ValueError(
                    f"{name} must be a power of two of at most 2^{stages} (one halving per stage, "
                    f"len(widths)-1 = {stages} stages); got 2^{downs:g}"
                )

    @property
    def stage_strides(self) -> list[tuple[int, int]]:
        """(temporal, spatial) stride of each downsampling stage; the earliest stages do the halving."""
        down_s = int(math.log2(self.spatial_compression // self.patch_size))
        down_t = int(math.log2(self.temporal_compression))
        return [(2 if i < down_t else 1, 2 if i < down_s else 1) for i in range(len(self.widths) - 1)]


NORM_GROUPS = 8  # channel groups of FrameGroupNorm (fewer when the width is not a multiple)

# A decode cache maps each causal convolution to the last input frames it saw, so the next
# temporal chunk continues where the previous one stopped. None means "the whole video at once".
ConvCache = dict


class CausalConv3d(nn.Module):
    """3D convolution padded in time only with past frames (the first frame replicated)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int] = (1, 1)):
        super().__init__()
        self.time_pad = kernel - 1
        self.time_stride = stride[0]
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride[:1] + stride[1:] * 2, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        if self.time_pad:
            if cache is not None and self in cache:
                past = cache[self]  # (B, C, k-1, H, W) the previous chunk's last frames
            else:
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # (B, C, k-1, H, W) replicate-first
            x = torch.cat([past, x], dim=2)  # (B, C, k-1+T, H, W)
            if cache is not None:
                if self.time_stride != 1:
                    raise RuntimeError("chunked (cached) convolution needs temporal stride 1")
                cache[self] = x[:, :, -self.time_pad :]
        return self.conv(x)  # (B, C_out, T/stride, H/stride, W/stride)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics over (channels of a group, H, W) of each frame on its own: frame-
    local, so chunked decoding equals whole decoding. Norms local to each pixel (RMS or LayerNorm
    over channels) were tried first and do not learn here: the autoencoder could not reconstruct
    even one clip's objects, while this norm learns them within a hundred steps."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(math.gcd(NORM_GROUPS, channels), channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B·T, C, H, W)
        return super().forward(frames).view(B, T, C, H, W).transpose(1, 2)  # (B, C, T, H, W)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.norm2 = FrameGroupNorm(channels)
        self.conv2 = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, C, T, H, W)
        h = self.conv2(F.silu(self.norm2(h)), cache)  # (B, C, T, H, W)
        return x + h  # (B, C, T, H, W)


class Upsample3d(nn.Module):
    """Depth-to-space/time: a causal conv makes st·ss·ss copies of the channels, then unfolds them.

    Each latent frame becomes st frames; the video's very first frame has no past, so the first
    of its st copies is dropped (T' frames -> st·(T'-1) + 1).
    """

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int]):
        super().__init__()
        self.st, self.ss = stride
        self.conv = CausalConv3d(c_in, c_out * self.st * self.ss * self.ss)

    def forward(self, x: torch.Tensor, cache: ConvCache | None, first_chunk: bool) -> torch.Tensor:
        B, _, T, H, W = x.shape
        st, ss = self.st, self.ss
        x = self.conv(x, cache)  # (B, C·st·ss·ss, T, H, W)
        x = x.view(B, -1, st, ss, ss, T, H, W)  # (B, C, st, ss, ss, T, H, W)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, T, st, H, ss, W, ss)
        x = x.reshape(B, -1, T * st, H * ss, W * ss)  # (B, C, T·st, H·ss, W·ss)
        if first_chunk and st > 1:
            x = x[:, :, st - 1 :]  # (B, C, 1 + st·(T-1), H·ss, W·ss)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: Causal3DConfig):
        super().__init__()
        self.patch = cfg.patch_size
        w = cfg.widths
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, w[0])
        self.levels = nn.ModuleList()
        for i, width in enumerate(w):
            blocks = nn.ModuleList(ResBlock3d(width) for _ in range(cfg.num_res_blocks))
            down = CausalConv3d(width, w[i + 1], stride=cfg.stage_strides[i]) if i < len(w) - 1 else None
            self.levels.append(nn.ModuleDict({"blocks": blocks, **({"down": down} if down is not None else {})}))
        self.norm_out = FrameGroupNorm(w[-1])
        self.conv_out = CausalConv3d(w[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        p = self.patch
        x = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B·T, 3, H, W) frames
        x = F.pixel_unshuffle(x, p)  # (B·T, 3·p·p, H/p, W/p) space-to-depth
        x = x.view(B, T, -1, H // p, W // p).transpose(1, 2)  # (B, 3·p·p, T, H/p, W/p)
        x = self.conv_in(x)  # (B, w0, T, H/p, W/p)
        for level in self.levels:
            for block in level["blocks"]:
                x = block(x)  # (B, w_i, T_i, H_i, W_i)
            if "down" in level:
                x = level["down"](x)  # (B, w_i+1, 1 + (T_i-1)/st, H_i/ss, W_i/ss)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2·C', T', H', W') mean and logvar


class Decoder(nn.Module):
    def __init__(self, cfg: Causal3DConfig):
        super().__init__()
        self.patch = cfg.patch_size
        w = cfg.widths[::-1]
        strides = cfg.stage_strides[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, w[0])
        self.levels = nn.ModuleList()
        for i, width in enumerate(w):
            blocks = nn.ModuleList(ResBlock3d(width) for _ in range(cfg.num_res_blocks))
            up = Upsample3d(width, w[i + 1], strides[i]) if i < len(w) - 1 else None
            self.levels.append(nn.ModuleDict({"blocks": blocks, **({"up": up} if up is not None else {})}))
        self.norm_out = FrameGroupNorm(w[-1])
        self.conv_out = CausalConv3d(w[-1], cfg.in_channels * cfg.patch_size**2)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        first_chunk = cache is None or not cache  # an empty cache: this is the video's start
        x = self.conv_in(z, cache)  # (B, w0, T', H', W')
        for level in self.levels:
            for block in level["blocks"]:
                x = block(x, cache)  # (B, w_i, T_i, H_i, W_i)
            if "up" in level:
                x = level["up"](x, cache, first_chunk)  # (B, w_i+1, T_i·st (-st+1 at the start), H_i·ss, W_i·ss)
        x = self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 3·p·p, T, H/p, W/p)
        B, _, T, h, w = x.shape
        x = x.transpose(1, 2).reshape(B * T, -1, h, w)  # (B·T, 3·p·p, H/p, W/p)
        x = F.pixel_shuffle(x, self.patch)  # (B·T, 3, H, W) depth-to-space
        return x.view(B, T, -1, h * self.patch, w * self.patch).transpose(1, 2)  # (B, 3, T, H, W)


class CausalVideoAutoencoder(VideoAutoencoder):
    """The causal3d video autoencoder. Build with keyword arguments of Causal3DConfig."""

    def __init__(self, **config):
        super().__init__()
        self.config = Causal3DConfig(**config)
        self.latent_channels = self.config.latent_channels
        self.temporal_compression = self.config.temporal_compression
        self.spatial_compression = self.config.spatial_compression
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def config_dict(self) -> dict:
        """The constructor's arguments as JSON-ready values (for model_index.json)."""
        out = asdict(self.config)
        out["widths"] = list(out["widths"])
        return out

    # -- encoding --------------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor) -> None:
        ct, cs, c = self.temporal_compression, self.spatial_compression, self.config.in_channels
        if video.dim() != 5:
            raise ValueError(f"video must be (B, {c}, T, H, W), got a tensor of shape {tuple(video.shape)}")
        _, C, T, H, W = video.shape
        if C != c:
            raise ValueError(f"video must have {c} channels (dim 1), got {C} in shape {tuple(video.shape)}")
        if (T - 1) % ct:
            raise ValueError(
                f"video has {T} frames; causal3d needs 1 + k·{ct} frames (1, {1 + ct}, {1 + 2 * ct}, ...): "
                f"trim to {1 + (T - 1) // ct * ct} or pad to {1 + -(-(T - 1) // ct) * ct}"
            )
        if H % cs or W % cs:
            raise ValueError(f"video height and width must be multiples of {cs}, got {H}x{W}; resize or pad")

    def encode_distribution(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) pixels -> posterior (mean, logvar), each (B, C', T', H', W'), not normalised."""
        self._check_video(video)
        moments = self.encoder(video)  # (B, 2·C', T', H', W')
        mean, logvar = moments.chunk(2, dim=1)  # (B, C', T', H', W') each
        return mean, logvar.clamp(-30.0, 20.0)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> the normalised latents the transformer sees."""
        return (raw - self.config.shift_factor) * self.config.scaling_factor

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.config.scaling_factor + self.config.shift_factor

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) pixels in [-1, 1] -> (B, C', T', H', W') normalised posterior means."""
        mean, _ = self.encode_distribution(video)
        return self.normalize(mean)

    # -- decoding --------------------------------------------------------------------------

    def _check_latent(self, latent: torch.Tensor) -> None:
        c = self.latent_channels
        if latent.dim() != 5 or latent.shape[1] != c:
            raise ValueError(f"latent must be (B, {c}, T', H', W'), got a tensor of shape {tuple(latent.shape)}")
        if latent.shape[2] < 1:
            raise ValueError("latent must have at least one frame")

    def _decode_frames(self, z: torch.Tensor, cache: ConvCache | None) -> torch.Tensor:
        """Raw latent frames (the next ones after those the cache has seen) -> pixel frames."""
        return self.decoder(z, cache)

    def iter_decode(self, latent: torch.Tensor, chunk_frames: int = 2, *, clamp: bool = True) -> Iterator[torch.Tensor]:
        """Decode `chunk_frames` latent frames at a time, yielding (B, 3, t, H, W) pixel chunks in order.

        The causal convolutions' last input frames are carried from chunk to chunk, so the
        chunks concatenated equal `decode(latent)`; only one chunk's activations are alive.
        """
        self._check_latent(latent)
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        z = self.denormalize(latent)  # (B, C', T', H', W')
        cache: ConvCache = {}
        for start in range(0, z.shape[2], chunk_frames):
            pixels = self._decode_frames(z[:, :, start : start + chunk_frames], cache)  # (B, 3, t, H, W)
            yield pixels.clamp(-1, 1) if clamp else pixels

    def decode(
        self,
        latent: torch.Tensor,
        *,
        chunk_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 2,
        clamp: bool = True,
    ) -> torch.Tensor:
        """(B, C', T', H', W') normalised latents -> (B, 3, 1 + ct·(T'-1), H'·cs, W'·cs) pixels in [-1, 1].

        chunk_frames: decode this many latent frames at a time (None: all at once); the result
            equals the unchunked decode up to float rounding.
        tile_size, tile_overlap: decode spatial tiles of tile_size latent pixels overlapping by
            tile_overlap, blended linearly across the overlap (None: no tiling); the norms see
            one tile at a time, so the result approximates the untiled decode.
        clamp: clip to [-1, 1] (training wants the raw output: clamp=False).
        """
        self._check_latent(latent)
        _, _, T, H, W = latent.shape
        if tile_size is None or (H <= tile_size and W <= tile_size):
            return self._decode_whole(latent, chunk_frames, clamp)
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size={tile_size}), got {tile_overlap}")
        cs = self.spatial_compression
        out = latent.new_zeros(latent.shape[0], self.config.in_channels, 1 + self.temporal_compression * (T - 1), H * cs, W * cs)
        weight = latent.new_zeros(1, 1, 1, H * cs, W * cs)
        for y in _tile_starts(H, tile_size, tile_overlap):
            for x in _tile_starts(W, tile_size, tile_overlap):
                tile = latent[:, :, :, y : y + tile_size, x : x + tile_size]  # (B, C', T', th, tw)
                pixels = self._decode_whole(tile, chunk_frames, clamp)  # (B, 3, T, th·cs, tw·cs)
                wy = _blend_ramp(tile.shape[3] * cs, tile_overlap * cs, y > 0, y + tile_size < H, latent)
                wx = _blend_ramp(tile.shape[4] * cs, tile_overlap * cs, x > 0, x + tile_size < W, latent)
                w = (wy[:, None] * wx[None, :]).view(1, 1, 1, *pixels.shape[3:])  # (1, 1, 1, th·cs, tw·cs)
                region = (slice(None),) * 3 + (slice(y * cs, y * cs + pixels.shape[3]), slice(x * cs, x * cs + pixels.shape[4]))
                out[region] += pixels * w
                weight[region] += w
        return out / weight

    def _decode_whole(self, latent: torch.Tensor, chunk_frames: int | None, clamp: bool) -> torch.Tensor:
        if chunk_frames is None:
            pixels = self._decode_frames(self.denormalize(latent), None)  # (B, 3, T, H, W)
            return pixels.clamp(-1, 1) if clamp else pixels
        return torch.cat(list(self.iter_decode(latent, chunk_frames, clamp=clamp)), dim=2)

    def forward(self, video: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, mean, logvar); samples the posterior unless sample=False."""
        mean, logvar = self.encode_distribution(video)  # (B, C', T', H', W') each
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean  # (B, C', T', H', W')
        return self.decoder(z), mean, logvar  # (B, 3, T, H, W)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, n), neighbours overlapping by at least `overlap`."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def _blend_ramp(size: int, overlap: int, ramp_in: bool, ramp_out: bool, like: torch.Tensor) -> torch.Tensor:
    """Per-pixel blend weights for one tile axis: rising over the first `overlap` pixels where a
    neighbour precedes, falling over the last where one follows, 1 elsewhere (always > 0)."""
    w = like.new_ones(size)
    if overlap:
        ramp = torch.arange(1, overlap + 1, dtype=like.dtype, device=like.device) / (overlap + 1)
        if ramp_in:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if ramp_out:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


@hookimpl
def register_video_autoencoders(register):
    register("causal3d", CausalVideoAutoencoder)
