"""Torch render path (CUDA/MPS, also runs on CPU): many frames per call with F.grid_sample."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gpu_service.talking_head.encoding import MODES, Encoding
from gpu_service.talking_head.shading import PreparedCache, mouth_layout, shade_eyes, shade_mouth

BLINK_L, BLINK_R = MODES.index("blink_l"), MODES.index("blink_r")


class _Prepared:
    """Per-encoding tensors resident on the device."""

    def __init__(self, enc: Encoding, device: torch.device) -> None:
        h, w = enc.crop.height, enc.crop.width
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        self.grid = torch.stack([xs, ys], -1).to(device)
        self.bases = torch.from_numpy(np.ascontiguousarray(enc.bases)).to(device)
        crop = torch.from_numpy(np.ascontiguousarray(enc.image[enc.crop.slices])).to(device)
        self.crop = crop.permute(2, 0, 1).float().unsqueeze(0)
        self.image = torch.from_numpy(enc.image).to(device)
        self.rel = self.grid - torch.from_numpy(enc.head_center).to(device)
        self.head_mask = torch.from_numpy(enc.head_mask).to(device)
        self.side = torch.from_numpy(enc.patch_side).to(device)
        self.patch_mask = torch.from_numpy(enc.patch_mask).to(device)
        self.eye_map = torch.from_numpy(enc.eye_map).to(device)
        self.eye_skin = torch.from_numpy(enc.eye_skin).permute(2, 0, 1).to(device)
        self._tables = {id(enc.lut_upper): torch.from_numpy(enc.lut_upper).to(device),
                        id(enc.lut_lower): torch.from_numpy(enc.lut_lower).to(device)}
        self.u0, self.step = enc.geometry.lut_u0, enc.geometry.lut_step
        self.mouth = mouth_layout(enc).convert(lambda a: torch.from_numpy(a).to(device))
        self.scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=device)
        self.shape = (h, w)

    def lut(self, table: np.ndarray, u: torch.Tensor) -> torch.Tensor:
        """Linear LUT interpolation, same as the CPU path."""
        t = self._tables[id(table)]
        idx = torch.clamp((u - self.u0) / self.step, 0.0, len(t) - 1.001)
        i0 = idx.floor().long()
        f = idx - i0
        return t[i0] * (1.0 - f) + t[i0 + 1] * f


def _sample(img: torch.Tensor, smap: torch.Tensor, prep: _Prepared, mode: str = "bilinear") -> torch.Tensor:
    """Sampling at absolute pixel coordinates (edge pixels repeat, as BORDER_REPLICATE)."""
    grid = smap * prep.scale - 1.0
    return F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)


class TorchRenderer:
    """Batched renderer; the same maths as CpuRenderer, on any torch device."""

    def __init__(self, device: str = "cpu", batch: int = 16, keep: int = 8) -> None:
        self.device = torch.device(device)
        self.batch = batch
        self._prepared = PreparedCache(lambda enc: _Prepared(enc, self.device), keep)

    def _prep(self, enc: Encoding) -> _Prepared:
        return self._prepared.get(enc)

    @torch.inference_mode()
    def render_crops(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> torch.Tensor:
        """(B, h, w, 3) uint8 animated crops for B frames of mode weights (and head poses)."""
        p = self._prep(enc)
        wt = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(self.device)
        b = wt.shape[0]
        smap = torch.einsum("bk,khwc->bhwc", wt, p.bases) + p.grid
        out = _sample(p.crop.expand(b, -1, -1, -1), smap, p)
        out = torch.clamp(torch.floor(out + 0.5), 0, 255)
        rows, cols = enc.patch.slices
        sub = smap[:, rows, cols]
        alpha, rgb = shade_mouth(sub[..., 0], sub[..., 1], p.side, enc, p.mouth, wt, p.lut, torch.clamp, p.patch_mask)
        region = out[:, :, rows, cols]
        a = alpha.unsqueeze(1)
        mixed = region * (1.0 - a) + torch.stack(rgb, 1) * a
        out[:, :, rows, cols] = torch.clamp(torch.floor(mixed + 0.5), 0, 255)
        if np.any(weights[:, [BLINK_L, BLINK_R]] > 0.0):
            rows, cols = enc.eye_patch.slices
            alpha, bright = shade_eyes(p.eye_map, wt[:, BLINK_L].view(b, 1, 1), wt[:, BLINK_R].view(b, 1, 1), torch.clamp)
            a = alpha.unsqueeze(1)
            region = out[:, :, rows, cols]
            mixed = region * (1.0 - a) + p.eye_skin.unsqueeze(0) * bright.unsqueeze(1) * a
            out[:, :, rows, cols] = torch.clamp(torch.floor(mixed + 0.5), 0, 255)
        if head is not None and np.any(head != 0.0):  # a still frame's row is exactly zero: it keeps `out`
            hp = torch.from_numpy(np.ascontiguousarray(head, dtype=np.float32)).to(self.device)
            moving = torch.from_numpy(np.any(head != 0.0, axis=1)).to(self.device).view(b, 1, 1, 1)
            c, s = torch.cos(hp[:, 0]).view(b, 1, 1), torch.sin(hp[:, 0]).view(b, 1, 1)
            rx = p.rel[..., 0] - hp[:, 1].view(b, 1, 1)
            ry = p.rel[..., 1] - hp[:, 2].view(b, 1, 1)
            m = p.head_mask
            hx = p.grid[..., 0] + m * (c * rx + s * ry - p.rel[..., 0])
            hy = p.grid[..., 1] + m * (-s * rx + c * ry - p.rel[..., 1])
            # Bicubic, as the CPU path: a second bilinear resampling would blur the face.
            warped = _sample(out, torch.stack([hx, hy], -1), p, mode="bicubic")
            out = torch.where(moving, torch.clamp(torch.floor(warped + 0.5), 0, 255), out)
        return out.permute(0, 2, 3, 1).to(torch.uint8)

    def frames(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> Iterator[np.ndarray]:
        """Full frames, rendered `batch` at a time on the device and handed back one by one."""
        rows, cols = enc.crop.slices
        p = self._prep(enc)
        for start in range(0, len(weights), self.batch):
            stop = min(start + self.batch, len(weights))
            crops = self.render_crops(enc, weights[start:stop], None if head is None else head[start:stop])
            full = p.image.unsqueeze(0).repeat(stop - start, 1, 1, 1)
            full[:, rows, cols] = crops
            for frame in full.cpu().numpy():
                yield frame
