"""Torch render path (CUDA/MPS, also runs on CPU): many frames per call with F.grid_sample.

Precision (`dtype`): the deformation fields (the largest tensors, one per mode) are stored and
summed in the chosen dtype (float16 on CUDA/MPS by default). The sampled image and its resampling
run in float16 too where the device's float16 grid_sample is accurate (checked at start on a ramp:
torch's CPU kernel returns NaN past about 200 pixels), with positions computed in float32 and only
the final normalised grid rounded (at most 0.12 px off on a 1000-pixel face). bfloat16 keeps 8 bits
of mantissa, a grid coordinate in it up to half a pixel off on a 400-pixel face: with bfloat16 the
sampling stays float32. The mouth's and eyelids' shading is float32 whatever the dtype (it compares
lip positions to a fraction of a pixel).

Out of memory: a batch that does not fit is halved (the cache emptied first) and tried again,
down to one frame; one frame that does not fit is a DeviceOutOfMemory (503). Each halving is
counted per device in gpu_service.oom. The smaller batch is kept for the following calls (a clip
is rendered in blocks of `batch` frames, each a call) and doubled back towards `batch` after
RECOVER_FRAMES frames render without running out of memory.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gpu_service import oom
from gpu_service.device import device_kind, torch_device
from gpu_service.errors import DeviceOutOfMemory
from gpu_service.talking_head.encoding import MODES, Encoding
from gpu_service.talking_head.shading import (PreparedCache, jaw_motion, lip_depths, mouth_alpha, mouth_colour,
                                              mouth_layout, other_map, seam_band, seam_shift, shade_eyes)

log = logging.getLogger(__name__)

BLINK_L, BLINK_R = MODES.index("blink_l"), MODES.index("blink_r")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OOM_RETRY_AFTER_S = 2
"""Retry-After of the 503 when a single frame does not fit: the memory is held by other work for now."""
RECOVER_FRAMES = 256
"""Frames rendered without running out of memory (about 10 s of video) before a halved batch is doubled again."""


def dtype_works(dtype: torch.dtype, device: str) -> bool:
    """Whether the render path's kernels (einsum, bilinear and bicubic grid_sample) run in `dtype` on `device`."""
    try:
        dev = torch.device(torch_device(device))
        img = torch.zeros(1, 3, 4, 4, dtype=dtype, device=dev)
        grid = torch.zeros(1, 4, 4, 2, dtype=dtype, device=dev)
        torch.einsum("bk,khwc->bhwc", torch.ones(1, 2, dtype=dtype, device=dev), torch.ones(2, 4, 4, 2, dtype=dtype, device=dev))
        for mode in ("bilinear", "bicubic"):
            F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def sampling_accurate(dtype: torch.dtype, device: str) -> bool:
    """Whether grid_sample in `dtype` on `device` resamples a 256-pixel ramp to within one grey level of float32."""
    if dtype == torch.float32:
        return True
    try:
        dev = torch.device(torch_device(device))
        n = 256
        ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
        img = ((0.7 * xs + 0.3 * ys) * (255.0 / n)).expand(1, 3, n, n).contiguous().to(dev)
        grid = (torch.stack([xs + 0.3, ys - 0.2], -1).unsqueeze(0) * (2.0 / (n - 1)) - 1.0).to(dev)
        for mode in ("bilinear", "bicubic"):
            ref = F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)
            low = F.grid_sample(img.to(dtype), grid.to(dtype), mode=mode, padding_mode="border", align_corners=True)
            err = (low.float() - ref).abs().max().item()
            if not err <= 1.0:  # NaN fails too
                return False
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """RENDER_DTYPE for a device: auto is float16 on CUDA/MPS (bfloat16 where float16 does not run), float32 on the CPU.

    An explicit dtype the device cannot run is a ValueError naming the device and what to set instead.
    """
    if requested == "auto":
        if device_kind(device) == "cpu":
            return torch.float32
        for dtype in (torch.float16, torch.bfloat16):
            if dtype_works(dtype, device):
                return dtype
        return torch.float32
    if requested not in DTYPES:
        raise ValueError(f"unknown render dtype {requested!r}; use auto, float32, float16 or bfloat16")
    dtype = DTYPES[requested]
    if not dtype_works(dtype, device):
        raise ValueError(f"RENDER_DTYPE={requested} does not run on {device} (its kernels are missing there); "
                         "set RENDER_DTYPE=auto or float32")
    return dtype


class _Prepared:
    """Per-encoding tensors resident on the device."""

    def __init__(self, enc: Encoding, device: torch.device, dtype: torch.dtype = torch.float32,
                 sample_dtype: torch.dtype = torch.float32) -> None:
        h, w = enc.crop.height, enc.crop.width
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        self.grid = torch.stack([xs, ys], -1).to(device)
        self.bases = torch.from_numpy(np.ascontiguousarray(enc.bases)).to(device, dtype)
        crop = torch.from_numpy(np.ascontiguousarray(enc.image[enc.crop.slices])).to(device)
        self.crop = crop.permute(2, 0, 1).to(sample_dtype).unsqueeze(0)
        self.image = torch.from_numpy(enc.image).to(device)
        self.rel = self.grid - torch.from_numpy(enc.head_center).to(device)
        self.head_mask = torch.from_numpy(enc.head_mask).to(device)
        self.side = torch.from_numpy(enc.patch_side).to(device)
        self.patch_mask = torch.from_numpy(enc.patch_mask).to(device)
        self.eye_map = torch.from_numpy(enc.eye_map).to(device)
        self.eye_skin = torch.from_numpy(enc.eye_skin).permute(2, 0, 1).to(device)
        self.eye_lash = torch.from_numpy(enc.eye_lash).permute(2, 0, 1).to(device)
        self._tables = {id(enc.lut_upper): torch.from_numpy(enc.lut_upper).to(device),
                        id(enc.lut_lower): torch.from_numpy(enc.lut_lower).to(device)}
        self.u0, self.step = enc.geometry.lut_u0, enc.geometry.lut_step
        self.mouth = mouth_layout(enc).convert(lambda a: torch.from_numpy(a).to(device))
        rows, cols, own = seam_band(enc)
        self.band = (torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device), torch.from_numpy(own).to(device))
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
    """Sampling at absolute pixel coordinates (edge pixels repeat, as BORDER_REPLICATE), in the image's dtype.

    The normalised grid is computed in float32 from float32 positions and rounded to the image's dtype last.
    """
    grid = (smap * prep.scale - 1.0).to(img.dtype)
    return F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)


class TorchRenderer:
    """Batched renderer; the same maths as CpuRenderer, on any torch device, in float32 or half precision."""

    def __init__(self, device: str = "cpu", batch: int = 16, keep: int = 8, dtype: str = "float32",
                 recover_frames: int = RECOVER_FRAMES) -> None:
        self.name = device
        """The device's name (cuda:1, cpu:0): what out-of-memory retries are counted under."""
        self.device = torch.device(torch_device(device))
        self.batch = batch
        self.fits = batch
        """The batch tried now: `batch`, or less since the device last ran out of memory."""
        self.recover_frames = recover_frames
        self._clean_frames = 0
        self.dtype = resolve_dtype(dtype, device)
        # bfloat16's 8-bit mantissa cannot hold a pixel position: its sampling stays float32 (see the module's docstring).
        half_sampling = self.dtype == torch.float16 and sampling_accurate(self.dtype, device)
        self.sample_dtype = self.dtype if half_sampling else torch.float32
        self._prepared = PreparedCache(lambda enc: _Prepared(enc, self.device, self.dtype, self.sample_dtype), keep)

    @property
    def precision(self) -> str:
        """The dtype's name (float32, float16, bfloat16), saying so when the sampling stays float32."""
        name = str(self.dtype).removeprefix("torch.")
        return name if self.sample_dtype == self.dtype else f"{name} fields, float32 sampling"

    def _prep(self, enc: Encoding) -> _Prepared:
        return self._prepared.get(enc)

    def forget(self, enc: Encoding) -> None:
        """Drop the device tensors prepared for `enc` (its avatar left this device's cache)."""
        self._prepared.forget(enc)

    @torch.inference_mode()
    def render_crops(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> torch.Tensor:
        """(B, h, w, 3) uint8 animated crops for B frames of mode weights (and head poses)."""
        p = self._prep(enc)
        wt = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(self.device)
        b = wt.shape[0]
        # The fields are summed in the render dtype (each is a few pixels at most); positions are float32.
        smap = torch.einsum("bk,khwc->bhwc", wt.to(self.dtype), p.bases).float() + p.grid
        rows, cols = enc.patch.slices
        sub = smap[:, rows, cols]
        o = other_map(p.mouth, wt)
        below_up, above_lo = lip_depths(sub[..., 0], sub[..., 1], p.side, enc, p.mouth, wt, p.lut, o)
        alpha = mouth_alpha(below_up, above_lo, enc, torch.clamp, p.patch_mask)
        motion = jaw_motion(p.mouth, wt)
        shift = seam_shift(below_up, above_lo, p.side, motion[0], enc, torch.clamp)
        if shift is not None:
            smap[:, rows, cols] = sub + torch.stack(shift, -1)
        out = _sample(p.crop.expand(b, -1, -1, -1), smap, p)
        out = torch.clamp(torch.floor(out + 0.5), 0, 255)
        br, bc, own = p.band
        if len(br):  # the seam's pixels, drawn from both lips (see shading.seam_band)
            pts = o[:, :, br, bc].permute(0, 2, 1).unsqueeze(1)  # (B, 1, N, 2) crop coordinates
            other = torch.clamp(torch.floor(_sample(p.crop.expand(b, -1, -1, -1), pts, p)[:, :, 0] + 0.5), 0, 255)
            yy, xx = br + enc.patch.y0, bc + enc.patch.x0
            mixed = out[:, :, yy, xx] * own + other * (1.0 - own)
            out[:, :, yy, xx] = torch.clamp(torch.floor(mixed + 0.5), 0, 255)
        rgb = mouth_colour(p.mouth, below_up, above_lo, *motion, enc, torch.clamp)
        region = out[:, :, rows, cols]
        a = alpha.unsqueeze(1)
        mixed = region * (1.0 - a) + torch.stack(rgb, 1) * a
        out[:, :, rows, cols] = torch.clamp(torch.floor(mixed + 0.5), 0, 255)
        if np.any(weights[:, [BLINK_L, BLINK_R]] > 0.0):
            rows, cols = enc.eye_patch.slices
            alpha, bright, lash = shade_eyes(p.eye_map, wt[:, BLINK_L].view(b, 1, 1), wt[:, BLINK_R].view(b, 1, 1),
                                             torch.clamp)
            a, lw = alpha.unsqueeze(1), lash.unsqueeze(1)
            region = out[:, :, rows, cols]
            lid = p.eye_skin.unsqueeze(0) * bright.unsqueeze(1) * (1.0 - lw) + p.eye_lash.unsqueeze(0) * lw
            mixed = region * (1.0 - a) + lid * a
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

    @torch.inference_mode()
    def render_block(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> np.ndarray:
        """(B, H, W, 3) uint8 full frames for B frames of mode weights, in one batch on the device."""
        rows, cols = enc.crop.slices
        p = self._prep(enc)
        crops = self.render_crops(enc, weights, head)
        full = p.image.unsqueeze(0).repeat(len(weights), 1, 1, 1)
        full[:, rows, cols] = crops
        return full.cpu().numpy()

    def frames(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> Iterator[np.ndarray]:
        """Full frames, rendered `batch` at a time on the device and handed back one by one.

        A batch that runs out of device memory is halved and rendered again (the following batches keep
        the smaller size, see the module's docstring); a single frame that does not fit raises DeviceOutOfMemory.
        """
        start = 0
        while start < len(weights):
            stop = min(start + max(self.fits, 1), len(weights))
            block = None
            try:
                block = self.render_block(enc, weights[start:stop], None if head is None else head[start:stop])
            except Exception as exc:
                if not oom.is_out_of_memory(exc):
                    raise
            if block is None:  # out of memory, handled here: the failed batch's traceback is gone, its tensors free
                oom.release(self.name)
                tried = stop - start
                if tried == 1:
                    raise DeviceOutOfMemory(
                        f"{self.name} is out of memory for even one frame of this avatar; retry shortly",
                        headers={"Retry-After": str(OOM_RETRY_AFTER_S)})
                self.fits, self._clean_frames = tried // 2, 0
                oom.record_retry(self.name)
                log.warning("render batch out of memory, halved", extra={"device": self.name, "tried": tried,
                                                                         "batch": self.fits})
                continue
            if self.fits < self.batch:
                self._clean_frames += stop - start
                if self._clean_frames >= self.recover_frames:  # the pressure may have passed: try a larger batch
                    self.fits, self._clean_frames = min(self.batch, 2 * self.fits), 0
            yield from block
            start = stop
