"""SpacetimeDiT: the diffusion transformer that predicts rectified-flow velocities on latent video.

After facebookresearch/DiT: patchify, N blocks with adaLN-Zero timestep conditioning, a final
adaLN layer, unpatchify. What video adds:

- spacetime patches (pt, ph, pw) through skyloom.ops.patchify; the model pads T/H/W up to the
  patch grid itself and crops after unpatchify, so any latent size works;
- 3D rotary position embeddings (head_dim split among the t, h and w axes), so any length,
  size and aspect ratio work with no position tables; optionally (absolute_position) fixed
  sin-cos features of each token's place as a fraction of the clip, so the model knows where
  the frame's edges and the clip's start are;
- self-attention through skyloom.ops.spacetime_attention, each block "spatial" (within a
  frame), "temporal" (across frames at one position) or "full";
- text through cross-attention to the text tokens, with the padding masked out, or
  (text_conditioning "joint") through SD3's joint attention: text tokens join the video
  tokens' attention, each with their own weights, and are updated block by block;
- frame conditioning: known latent frames (cond_latent, where cond_mask is 1) are concatenated
  to the noisy latent on channels, so one model does text-to-video, image-to-video and
  extension.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from skyloom import ops

ATTENTION_MODES = ("full", "spatial", "temporal")
PREDICTIONS = ("velocity", "sample")
TEXT_CONDITIONINGS = ("cross", "joint")
# A "sample" head's velocity is (x_t - sample) / t: t is floored here so that errors near t = 0
# are not magnified without bound (Li & He floor 1 - t at 0.05 in their time convention).
SAMPLE_PREDICTION_MIN_T = 0.05


@dataclass
class DiTConfig:
    in_channels: int = 8  # C: latent channels (the input is [x, cond_latent, cond_mask]: 2C+1)
    text_dim: int = 384  # width of the text encoder's token embeddings (MiniLM: 384)
    hidden_size: int = 384  # transformer width
    depth: int = 12  # number of blocks
    num_heads: int = 6  # attention heads; head_dim = hidden_size / num_heads
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent voxels per token
    mlp_ratio: float = 4.0  # MLP hidden width / hidden_size
    attention_modes: tuple[str, ...] = ("spatial", "temporal")  # per block, repeated to depth
    rope_theta: float = 10000.0  # RoPE base
    rope_axes_dim: tuple[int, int, int] | None = None  # head_dim split among (t, h, w); None: ~1/4 to t
    qk_norm: bool = True  # RMS-normalise queries and keys per head (stabler training)
    pooled_text: bool = True  # add the mask-averaged text tokens to the timestep embedding
    # Add fixed sin-cos features of each token's place as a fraction of the clip's duration,
    # height and width (as DiT and PixArt add absolute positions). RoPE alone is relative, so at
    # high noise a token cannot tell the frame's edges or the clip's first frame from the rest.
    absolute_position: bool = False
    # What the network's output head predicts (diffusers' prediction_type names): "velocity"
    # (noise - data) directly, or the clean latents ("sample"), from which forward() derives the
    # velocity. A head predicting clean latents need not carry the noise through a residual
    # stream narrower than twice the token (hidden 192 against 128 values per 4x4 token), as
    # "Back to Basics: Let Denoising Generative Models Denoise" (Li & He, 2025) argues.
    prediction: str = "velocity"
    # Channels of a convolutional output head (0: DiT's linear head alone). With k > 0 the final
    # linear writes k features per latent voxel, and two 3x3 convolutions within each latent frame
    # turn them into the output, so that neighbouring tokens draw the edges and corners they share
    # (as U-ViT's last 3x3 conv; here a token is 4x4 latent pixels, an object one or two tokens).
    output_conv: int = 0
    # How video tokens read the prompt: "cross" (DiT/PixArt: cross-attention to fixed text
    # tokens in each block) or "joint" (SD3's MMDiT: text tokens join the self-attention with
    # their own projections, adaLN and MLP, so each block's text tokens carry what the video
    # made of the previous block's: a colour word can learn which object it is on). "joint"
    # needs "full" attention in every block.
    text_conditioning: str = "cross"
    gradient_checkpointing: bool = False  # recompute block activations in backward (saves memory)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.attention_modes = (self.attention_modes,) if isinstance(self.attention_modes, str) else tuple(self.attention_modes)
        if self.rope_axes_dim is not None:
            self.rope_axes_dim = tuple(int(d) for d in self.rope_axes_dim)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        bad = [m for m in self.attention_modes if m not in ATTENTION_MODES]
        if bad or not self.attention_modes:
            raise ValueError(f"attention_modes must be a non-empty sequence of {ATTENTION_MODES}, got {self.attention_modes}")
        if self.absolute_position and self.hidden_size % 2:
            raise ValueError(f"absolute_position needs an even hidden_size (sin-cos pairs), got {self.hidden_size}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.text_conditioning not in TEXT_CONDITIONINGS:
            raise ValueError(f"text_conditioning must be one of {TEXT_CONDITIONINGS}, got {self.text_conditioning!r}")
        if self.text_conditioning == "joint" and set(self.attention_modes) != {"full"}:
            raise ValueError(
                f'text_conditioning "joint" attends over all video and text tokens at once, so it needs '
                f'attention_modes ["full"], got {list(self.attention_modes)}'
            )
        if isinstance(self.output_conv, bool) or not isinstance(self.output_conv, int) or self.output_conv < 0:
            raise ValueError(f"output_conv must be 0 (no convolutional head) or a channel count > 0, got {self.output_conv!r}")
        axes = self.rope_dims
        if sum(axes) != self.head_dim or any(d % 2 for d in axes):
            raise ValueError(f"rope_axes_dim must be three even numbers summing to head_dim={self.head_dim}, got {axes}")

    def num_tokens(self, frames: int, height: int, width: int) -> int:
        """Tokens of a (frames, height, width) latent grid, padded to whole patches."""
        pt, ph, pw = self.patch_size
        return -(-frames // pt) * -(-height // ph) * -(-width // pw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """(t, h, w) shares of head_dim: h and w equal, the rest (about a quarter) to t."""
        if self.rope_axes_dim is not None:
            return self.rope_axes_dim
        hw = 2 * ((self.head_dim * 3 // 8) // 2)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def block_modes(self) -> tuple[str, ...]:
        """The attention mode of each block: attention_modes repeated to depth."""
        return tuple(self.attention_modes[i % len(self.attention_modes)] for i in range(self.depth))

    def to_dict(self) -> dict:
        """JSON-ready values (tuples as lists), for model_index.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)


# Size variants (DiT's naming); build one with dit_config("DiT-S", in_channels=..., ...).
DIT_CONFIGS: dict[str, DiTConfig] = {
    "DiT-XS": DiTConfig(hidden_size=192, depth=6, num_heads=3),
    "DiT-S": DiTConfig(hidden_size=384, depth=12, num_heads=6),
    "DiT-B": DiTConfig(hidden_size=768, depth=12, num_heads=12),
    "DiT-L": DiTConfig(hidden_size=1024, depth=24, num_heads=16),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """The named size variant with `overrides` applied (e.g. text_dim, patch_size)."""
    if name not in DIT_CONFIGS:
        raise KeyError(f"unknown DiT size {name!r}; valid sizes: {', '.join(DIT_CONFIGS)}")
    return replace(DIT_CONFIGS[name], **overrides)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --- embedders -----------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden): sinusoidal features of 1000·t through an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(1000.0 * t, self.frequency_size)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, hidden)


class RotaryEmbedding3D(nn.Module):
    """Rotations for the (t, h, w) position of every token: each axis rotates its share of head_dim."""

    def __init__(self, axes_dim: tuple[int, int, int], theta: float):
        super().__init__()
        self.axes_dim, self.theta = axes_dim, theta

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T', S, 1, head_dim/2), for a T'×H'×W' token grid."""
        angles = []
        for n, dim in zip(grid, self.axes_dim):
            inv = self.theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)  # (dim/2,)
            angles.append(torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv)  # (n, dim/2)
        gt, gh, gw = grid
        a_t = angles[0][:, None, None].expand(gt, gh, gw, -1)  # (T', H', W', dt/2)
        a_h = angles[1][None, :, None].expand(gt, gh, gw, -1)  # (T', H', W', dh/2)
        a_w = angles[2][None, None, :].expand(gt, gh, gw, -1)  # (T', H', W', dw/2)
        angle = torch.cat([a_t, a_h, a_w], dim=-1).reshape(gt, gh * gw, 1, -1)  # (T', S, 1, head_dim/2)
        return angle.cos().float(), angle.sin().float()


class FractionalPositionEmbedding(nn.Module):
    """Fixed (T', S, hidden) sin-cos features of each token's (t, h, w) place as a fraction of the
    grid: t from 0 (first latent frame) to 1 (last), h and w at cell centres in (0, 1). Fractions
    rather than indices, so "the top edge" and "the clip's end" mean the same at every size and
    duration. Each axis gets about a third of hidden; its frequencies run from pi (a half cycle
    over the axis, so cos is monotonic in it) to 32 pi."""

    def __init__(self, hidden_size: int):
        super().__init__()
        hw = 2 * ((hidden_size // 3) // 2)
        self.axes_dim = (hidden_size - 2 * hw, hw, hw)

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        gt, gh, gw = grid
        places = (
            torch.arange(gt, dtype=torch.float64, device=device) / max(gt - 1, 1),
            (torch.arange(gh, dtype=torch.float64, device=device) + 0.5) / gh,
            (torch.arange(gw, dtype=torch.float64, device=device) + 0.5) / gw,
        )
        features = []
        for u, dim in zip(places, self.axes_dim):
            freqs = math.pi * 2.0 ** torch.linspace(0, 5, dim // 2, dtype=torch.float64, device=device)  # (dim/2,)
            angle = u[:, None] * freqs  # (n, dim/2)
            features.append(torch.cat([angle.cos(), angle.sin()], dim=-1))  # (n, dim)
        f_t = features[0][:, None, None].expand(gt, gh, gw, -1)
        f_h = features[1][None, :, None].expand(gt, gh, gw, -1)
        f_w = features[2][None, None, :].expand(gt, gh, gw, -1)
        return torch.cat([f_t, f_h, f_w], dim=-1).reshape(gt, gh * gw, -1).float()  # (T', S, hidden)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, T', S, heads, head_dim) by the position angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T', S, heads, head_dim/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T', S, heads, head_dim/2, 2)
    return out.flatten(-2).type_as(x)  # (B, T', S, heads, head_dim)


# --- blocks --------------------------------------------------------------------------------


def head_norm(cfg: DiTConfig) -> nn.Module:
    """What normalises each head's queries or keys: RMSNorm with qk_norm, else nothing."""
    return nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, mode: str):
        super().__init__()
        self.mode, self.num_heads = mode, cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = head_norm(cfg)
        self.k_norm = head_norm(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, S, D = x.shape
        q, k, v = self.qkv(x).view(B, T, S, 3, self.num_heads, -1).unbind(3)  # (B, T', S, heads, head_dim) each
        q = apply_rope(self.q_norm(q), *rope)  # (B, T', S, heads, head_dim)
        k = apply_rope(self.k_norm(k), *rope)  # (B, T', S, heads, head_dim)
        out = ops.spacetime_attention(q, k, v, self.mode)  # (B, T', S, heads, head_dim)
        return self.proj(out.reshape(B, T, S, D))  # (B, T', S, D)


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d, masked) · v as plain matmuls: F.scaled_dot_product_attention's result.

    q: (B, heads, N, d); k, v: (B, heads, L, d); mask: bool, broadcastable to (B, heads, N, L),
    True where a query may see a key (every row needs one). A prompt is short (L = 64 tokens
    with MiniLM), so the (N, L) scores are small, and torch's CPU flash-attention backward is
    5× slower in bf16 than this (benchmarks/bench_training.py). Joint attention uses it too,
    over the video and text tokens together (keys N + L, a few hundred at most here).
    """
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, N, L)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v  # (B, heads, N, d)


class CrossAttention(nn.Module):
    """Video tokens attend to the text tokens; padded text tokens are masked out."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.q_norm = head_norm(cfg)
        self.k_norm = head_norm(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q_norm(self.q(x).view(B, N, self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, head_dim)
        k, v = self.kv(text).view(B, text.shape[1], 2, self.num_heads, -1).unbind(2)  # (B, L, heads, head_dim) each
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, head_dim) each
        # A prompt with no real token attends to nothing: let it see all keys, then zero its output.
        has_text = text_mask.any(dim=1)  # (B,)
        mask = (text_mask | ~has_text[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = text_attention(q, k, v, mask)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(B, N, D) * has_text.view(B, 1, 1).to(x.dtype)  # (B, N, D)
        return self.proj(out)  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention (spatial/temporal/full), cross-attention to text, and an MLP."""

    def __init__(self, cfg: DiTConfig, mode: str):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, mode)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=True, eps=1e-6)
        self.cross = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, text, text_mask, rope):
        """(video tokens, text tokens) after the block; the text tokens pass through unchanged."""
        B, T, S, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        h = modulate(self.norm1(x).view(B, T * S, D), shift_msa, scale_msa)  # (B, N, D)
        x = x + gate_msa.view(B, 1, 1, D) * self.attn(h.view(B, T, S, D), rope)  # (B, T', S, D)
        x = x + self.cross(self.norm2(x).view(B, T * S, D), text, text_mask).view(B, T, S, D)  # (B, T', S, D)
        h = modulate(self.norm3(x).view(B, T * S, D), shift_mlp, scale_mlp)  # (B, N, D)
        return x + gate_mlp.view(B, 1, 1, D) * self.mlp(h).view(B, T, S, D), text  # (B, T', S, D), (B, L, D)


class JointAttention(nn.Module):
    """One attention over video and text tokens (SD3's MMDiT), each with its own projections.

    Video queries and keys get RoPE, text ones none; padded text tokens are masked out as keys.
    With update_text False (the last block, whose text nobody reads) the text gives keys and
    values only.
    """

    def __init__(self, cfg: DiTConfig, update_text: bool):
        super().__init__()
        D, self.num_heads, self.update_text = cfg.hidden_size, cfg.num_heads, update_text
        self.qkv = nn.Linear(D, 3 * D)
        self.text_qkv = nn.Linear(D, (3 if update_text else 2) * D)
        self.q_norm, self.k_norm, self.text_k_norm = head_norm(cfg), head_norm(cfg), head_norm(cfg)
        self.text_q_norm = head_norm(cfg) if update_text else None
        self.proj = nn.Linear(D, D)
        self.text_proj = nn.Linear(D, D) if update_text else None

    def forward(self, x, text, text_mask, rope):
        B, T, S, D = x.shape
        N, L = T * S, text.shape[1]
        q, k, v = self.qkv(x).view(B, T, S, 3, self.num_heads, -1).unbind(3)  # (B, T', S, heads, head_dim) each
        q = apply_rope(self.q_norm(q), *rope).view(B, N, self.num_heads, -1)  # (B, N, heads, head_dim)
        k = apply_rope(self.k_norm(k), *rope).view(B, N, self.num_heads, -1)  # (B, N, heads, head_dim)
        text_parts = self.text_qkv(text).view(B, L, -1, self.num_heads, D // self.num_heads).unbind(2)
        tk, tv = self.text_k_norm(text_parts[-2]), text_parts[-1]  # (B, L, heads, head_dim) each
        keys = torch.cat([k, tk], dim=1).transpose(1, 2)  # (B, heads, N+L, head_dim)
        values = torch.cat([v.reshape(B, N, self.num_heads, -1), tv], dim=1).transpose(1, 2)  # (B, heads, N+L, head_dim)
        queries = torch.cat([q, self.text_q_norm(text_parts[0])], dim=1) if self.update_text else q
        visible = torch.cat([text_mask.new_ones(B, N), text_mask], dim=1)[:, None, None, :]  # (B, 1, 1, N+L)
        out = text_attention(queries.transpose(1, 2), keys, values, visible)  # (B, heads, N(+L), head_dim)
        out = out.transpose(1, 2).reshape(B, -1, D)  # (B, N(+L), D)
        video = self.proj(out[:, :N]).view(B, T, S, D)  # (B, T', S, D)
        return video, (self.text_proj(out[:, N:]) if self.update_text else None)  # (B, L, D) or None


class JointBlock(nn.Module):
    """SD3's MMDiT block: video and text tokens each have their own adaLN-Zero modulation
    (from the timestep embedding), projections and MLP, and attend together in one attention.
    With update_text False (LastJointBlock) the text tokens leave it as they came."""

    def __init__(self, cfg: DiTConfig, update_text: bool):
        super().__init__()
        D, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.update_text = update_text
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.text_norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(cfg, update_text)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.text_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, (6 if update_text else 2) * D))
        if update_text:
            self.text_norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.text_mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))

    def forward(self, x, c, text, text_mask, rope):
        """(video tokens, text tokens) after the block."""
        return self._forward(x, c, text, text_mask, rope)

    def _forward(self, x, c, text, text_mask, rope):
        B, T, S, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        text_mod = self.text_adaLN_modulation(c).chunk(6 if self.update_text else 2, dim=1)  # (B, D) each
        h = modulate(self.norm1(x).view(B, T * S, D), shift_msa, scale_msa).view(B, T, S, D)  # (B, T', S, D)
        video_out, text_out = self.attn(h, modulate(self.text_norm1(text), text_mod[0], text_mod[1]), text_mask, rope)
        x = x + gate_msa.view(B, 1, 1, D) * video_out  # (B, T', S, D)
        h = modulate(self.norm3(x).view(B, T * S, D), shift_mlp, scale_mlp)  # (B, N, D)
        x = x + gate_mlp.view(B, 1, 1, D) * self.mlp(h).view(B, T, S, D)  # (B, T', S, D)
        if self.update_text:
            _, _, text_gate_msa, text_shift_mlp, text_scale_mlp, text_gate_mlp = text_mod
            text = text + text_gate_msa.unsqueeze(1) * text_out  # (B, L, D)
            h = modulate(self.text_norm3(text), text_shift_mlp, text_scale_mlp)  # (B, L, D)
            text = text + text_gate_mlp.unsqueeze(1) * self.text_mlp(h)  # (B, L, D)
        return x, text


class LastJointBlock(JointBlock):
    """The last joint block: its text tokens give keys and values only (nobody reads them after)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg, update_text=False)

    def forward(self, x, c, text, text_mask, rope):
        # Its own forward, not the inherited one: torch.compile keeps graphs per function, and
        # this block's other weights' shapes would otherwise recompile the others' graphs.
        return self._forward(x, c, text, text_mask, rope)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, math.prod(cfg.patch_size) * (cfg.output_conv or cfg.in_channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, K·pt·ph·pw), K = output_conv or C


# --- the model -----------------------------------------------------------------------------


class SpacetimeDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        D, C = cfg.hidden_size, cfg.in_channels
        self.x_embedder = nn.Linear((2 * C + 1) * math.prod(cfg.patch_size), D)  # [x, cond_latent, cond_mask] patches
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.pool_embedder = (
            nn.Sequential(nn.Linear(cfg.text_dim, D), nn.SiLU(), nn.Linear(D, D)) if cfg.pooled_text else None
        )
        self.rope = RotaryEmbedding3D(cfg.rope_dims, cfg.rope_theta)
        self.position = FractionalPositionEmbedding(D) if cfg.absolute_position else None
        if cfg.text_conditioning == "joint":
            self.blocks = nn.ModuleList([*(JointBlock(cfg, update_text=True) for _ in range(cfg.depth - 1)), LastJointBlock(cfg)])
        else:
            self.blocks = nn.ModuleList(DiTBlock(cfg, mode) for mode in cfg.block_modes)
        self.final_layer = FinalLayer(cfg)
        K = cfg.output_conv
        self.output_conv = (
            nn.Sequential(
                nn.Conv3d(K, K, (1, 3, 3), padding=(0, 1, 1)), nn.SiLU(), nn.Conv3d(K, C, (1, 3, 3), padding=(0, 1, 1))
            )
            if K
            else None
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init. Zeroed, so every block starts as the identity and the output as exactly 0:
        each block's adaLN modulation and cross-attention output projection (joint blocks: both
        adaLN modulations, so text tokens also pass through unchanged), and the final
        layer's adaLN modulation and linear (with a convolutional head, its last convolution
        instead: zeroing the linear too would leave both without a gradient)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding like a conv's: xavier over the flattened patch (as DiT's x_embedder.proj).
        nn.init.xavier_uniform_(self.x_embedder.weight)
        # Timestep and text embedding MLPs: small normal, as DiT.
        for mlp in (self.t_embedder.mlp, self.y_embedder, self.pool_embedder):
            if mlp is not None:
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: gates start at zero, so each block is the identity at init.
        for block in self.blocks:
            zeroed = [block.adaLN_modulation[-1]]
            zeroed += [block.text_adaLN_modulation[-1]] if isinstance(block, JointBlock) else [block.cross.proj]
            for layer in zeroed:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        # Output layer: zero, so the initial velocity is exactly 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        last = self.output_conv[-1] if self.output_conv is not None else self.final_layer.linear
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def compile_blocks(self) -> None:
        """torch.compile each block in place, shape-generic (dynamic=True), so new bucket shapes
        rarely recompile. The weights' names stay the plain ones, and a deepcopy (the EMA copy)
        is an uncompiled module."""
        for block in self.blocks:
            block.compile(dynamic=True)

    def _check_inputs(self, x, t, text_tokens, text_mask, cond_latent, cond_mask) -> torch.Tensor:
        C, Dt = self.config.in_channels, self.config.text_dim
        if x.dim() != 5 or x.shape[1] != C:
            raise ValueError(f"x must be (B, {C}, T, H, W) latents, got shape {tuple(x.shape)}")
        B, _, T = x.shape[:3]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a float or a (B,) = ({B},) tensor of times in [0, 1], got shape {tuple(t.shape)}")
        if text_tokens.dim() != 3 or text_tokens.shape[0] != B or text_tokens.shape[2] != Dt:
            raise ValueError(f"text_tokens must be (B={B}, L, text_dim={Dt}), got shape {tuple(text_tokens.shape)}")
        if text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask must be (B, L) = {tuple(text_tokens.shape[:2])}, got shape {tuple(text_mask.shape)}")
        if cond_latent is not None and cond_latent.shape != x.shape:
            raise ValueError(f"cond_latent must have x's shape {tuple(x.shape)}, got {tuple(cond_latent.shape)}")
        if cond_mask is not None and cond_mask.shape != (B, T):
            raise ValueError(f"cond_mask must be (B, T) = ({B}, {T}), got shape {tuple(cond_mask.shape)}")
        return t

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        cond_latent: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rectified-flow velocity (noise - data) at noisy latents x and time t.

        x: (B, C, T, H, W) noisy latents; any T, H, W (padded to the patch grid internally).
        t: (B,) or a scalar, in [0, 1], 1 = pure noise.
        text_tokens: (B, L, text_dim); text_mask: (B, L) bool, True for real tokens.
        cond_latent: (B, C, T, H, W) known clean latent frames, zeros elsewhere (None: zeros).
        cond_mask: (B, T), 1 where a latent frame is given (None: no frame is given).
        Returns (B, C, T, H, W).
        """
        t = self._check_inputs(x, t, text_tokens, text_mask, cond_latent, cond_mask)
        B, C, T, H, W = x.shape
        pt, ph, pw = self.config.patch_size
        cond_latent = torch.zeros_like(x) if cond_latent is None else cond_latent.to(x.dtype)
        cond_mask = x.new_zeros(B, T) if cond_mask is None else cond_mask.to(x.dtype)
        text_mask = text_mask.bool()

        mask_channel = cond_mask.view(B, 1, T, 1, 1).expand(B, 1, T, H, W)  # (B, 1, T, H, W)
        h = torch.cat([x, cond_latent, mask_channel], dim=1)  # (B, 2C+1, T, H, W)
        h = F.pad(h, (0, -W % pw, 0, -H % ph, 0, -T % pt))  # (B, 2C+1, T'·pt, H'·ph, W'·pw)
        grid = (h.shape[2] // pt, h.shape[3] // ph, h.shape[4] // pw)  # (T', H', W')
        h = ops.patchify(h, (pt, ph, pw))  # (B, N, (2C+1)·pt·ph·pw), N = T'·H'·W'
        h = self.x_embedder(h).view(B, grid[0], grid[1] * grid[2], -1)  # (B, T', S, D), S = H'·W'
        if self.position is not None:
            h = h + self.position(grid, x.device).to(h.dtype)  # (T', S, D) broadcast over B

        if self.config.text_conditioning == "joint":
            # A joint model's text tokens go through every block: drop the columns that are padding
            # in every prompt of the batch (prompts come padded to the encoder's max_length, 64 for
            # MiniLM, against about 20 real tokens). Masked out, they changed nothing.
            keep = text_mask.any(dim=0)  # (L,)
            keep[0] = True  # a batch of empty prompts keeps one (masked) column
            text_tokens, text_mask = text_tokens[:, keep], text_mask[:, keep]  # (B, L', text_dim), (B, L')
        c = self.t_embedder(t)  # (B, D)
        text = self.y_embedder(text_tokens)  # (B, L, D)
        if self.pool_embedder is not None:
            weights = text_mask.to(text_tokens.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (text_tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, text_dim)
            c = c + self.pool_embedder(pooled)  # (B, D)
        rope = self.rope(grid, x.device)  # (T', S, 1, head_dim/2) cos and sin

        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, text = checkpoint(block, h, c, text, text_mask, rope, use_reentrant=False)  # (B, T', S, D), (B, L, D)
            else:
                h, text = block(h, c, text, text_mask, rope)  # (B, T', S, D), (B, L, D)

        out = self.final_layer(h.flatten(1, 2), c)  # (B, N, K·pt·ph·pw)
        out = ops.unpatchify(out, (pt, ph, pw), grid)[:, :, :T, :H, :W]  # (B, K, T, H, W)
        if self.output_conv is not None:
            out = self.output_conv(out)  # (B, C, T, H, W)
        if self.config.prediction == "sample":
            # x_t = (1 - t)·data + t·noise, so the velocity noise - data is (x_t - data) / t.
            out = (x - out.to(x.dtype)) / t.to(x.dtype).clamp(min=SAMPLE_PREDICTION_MIN_T).view(B, 1, 1, 1, 1)
        return out
