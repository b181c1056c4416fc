"""Flow matching (rectified flow): timestep sampling and shift, training pairs, Euler sampling.

Every random choice uses torch's global RNG (the trainer seeds it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Wan timestep shift: t' = s t / (1 + (s - 1) t); s > 1 favours noisier t."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, shift: float = 1.0, kind: str = "logit_normal", device=None):
    """(n,) flow times in (0, 1) from the global RNG: logit-normal (SD3) or uniform, shifted."""
    if kind == "logit_normal":
        t = torch.sigmoid(torch.randn(n, device=device))
    elif kind == "uniform":
        t = torch.rand(n, device=device)
    else:
        raise ValueError(f"timestep sampling {kind!r}; allowed: logit_normal, uniform")
    return shift_timesteps(t, shift)


def flow_pair(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t noise and the velocity target noise - x0 (rectified flow)."""
    noise = torch.randn_like(x0)
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise, noise - x0


# velocity(x_t (B, T', C, h, w), t (B,) float32, uncond) -> predicted velocity like x_t;
# uncond=True: the family's null condition (what condition dropout trains)
Velocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@torch.no_grad()
def euler_sample(
    velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0, guidance: float = 1.0
) -> torch.Tensor:
    """Integrate the flow from noise (t = 1) to data (t = 0) with ``steps`` Euler steps on the
    shifted grid ``shift_timesteps(linspace(1, 0, steps + 1), shift)`` (the training shift).
    ``guidance`` != 1: classifier-free guidance ``v_u + guidance * (v_c - v_u)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    # The state accumulates in fp32 (bf16 would lose ~1e-2 over 20 steps); the model sees its
    # own dtype.
    dtype, x = noise.dtype, noise.float()
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        tt = torch.full((x.shape[0],), t, device=x.device)
        v = velocity(x.to(dtype), tt, False).float()
        if guidance != 1.0:
            v_uncond = velocity(x.to(dtype), tt, True).float()
            v = v_uncond + guidance * (v - v_uncond)
        x = x + (t_next - t) * v
    return x.to(dtype)
