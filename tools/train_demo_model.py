"""Train the demo network (a small BasicSR EDSR, x2) on scikit-image's bundled sample images.

    python tools/train_demo_model.py

Measured 2026-11-26 on the project's 2-core machine (torch 2.14.1 CPU, machine shared with other jobs):
386 s wall, 290 CPU seconds; held-out PSNR-Y 33.55 dB against 32.52 dB for bicubic. A rerun on the
same torch build gave bit-identical weights.

Trains on random patches of ``oaq_plugin.demo.sample_images.TRAIN_IMAGES`` (LR made by BasicSR's
MATLAB-style bicubic ``imresize``), L1 loss, Adam with a cosine schedule, everything seeded; writes
``{'params': state_dict}`` to ``oaq_plugin/demo/demo_edsr_x2.pth`` and prints the PSNR-Y of the
network and of bicubic upsampling on the held-out images, which training never sees.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oaq_plugin.compat import install_basicsr_compat  # noqa: E402
from oaq_plugin.demo import network as demo_network  # noqa: E402
from oaq_plugin.demo import sample_images  # noqa: E402

install_basicsr_compat()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--iters', type=int, default=600, help='training iterations (default: 600)')
    parser.add_argument('--batch-size', type=int, default=8, help='patches per iteration (default: 8)')
    parser.add_argument('--patch-size', type=int, default=32, help='LR patch side in pixels (default: 32)')
    parser.add_argument('--lr', type=float, default=2e-3, help='initial Adam learning rate (default: 2e-3)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default: 2)')
    parser.add_argument('--out', type=Path, default=demo_network.WEIGHTS_PATH,
                        help=f'where to write the weights (default: {demo_network.WEIGHTS_PATH})')
    return parser.parse_args(argv)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().clamp(0, 1).mul(255.0).round().byte().squeeze(0).numpy()
    return array.transpose(1, 2, 0)


class PatchSampler:
    """Aligned random LR/HR patch pairs with flips and rotations, from a fixed seed."""

    def __init__(self, pairs: List[Tuple[torch.Tensor, torch.Tensor]], scale: int, seed: int) -> None:
        self.pairs = pairs
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.generator))

    def batch(self, batch_size: int, patch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        lrs, hrs = [], []
        for _ in range(batch_size):
            hr, lr = self.pairs[self._randint(len(self.pairs))]
            top = self._randint(lr.shape[1] - patch_size + 1)
            left = self._randint(lr.shape[2] - patch_size + 1)
            lr_patch = lr[:, top:top + patch_size, left:left + patch_size]
            s = self.scale
            hr_patch = hr[:, s * top:s * (top + patch_size), s * left:s * (left + patch_size)]
            if self._randint(2):
                lr_patch, hr_patch = lr_patch.flip(-1), hr_patch.flip(-1)
            if self._randint(2):
                lr_patch, hr_patch = lr_patch.flip(-2), hr_patch.flip(-2)
            turns = self._randint(4)
            lrs.append(torch.rot90(lr_patch, turns, dims=(-2, -1)))
            hrs.append(torch.rot90(hr_patch, turns, dims=(-2, -1)))
        return torch.stack(lrs), torch.stack(hrs)


def held_out_psnr(net: torch.nn.Module, scale: int) -> Dict[str, Tuple[float, float]]:
    """``{image: (network PSNR-Y, bicubic PSNR-Y)}`` on the held-out images, crop = scale, as the demo measures."""
    from basicsr.metrics.psnr_ssim import calculate_psnr

    results = {}
    for name in sample_images.HELD_OUT_IMAGES:
        hr, lr = sample_images.hr_lr_pair(name, scale)
        with torch.no_grad():
            sr = to_uint8(net(to_tensor(lr).unsqueeze(0)))
        bicubic = sample_images.bicubic_resize(lr, scale)
        # calculate_psnr takes BGR images for the Y channel, as BasicSR reads them with OpenCV.
        results[name] = (calculate_psnr(sr[..., ::-1], hr[..., ::-1], scale, test_y_channel=True),
                         calculate_psnr(bicubic[..., ::-1], hr[..., ::-1], scale, test_y_channel=True))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    scale = demo_network.NETWORK_G['upscale']
    start = time.perf_counter()

    pairs = []
    for name in sample_images.TRAIN_IMAGES:
        hr, lr = sample_images.hr_lr_pair(name, scale)
        pairs.append((to_tensor(hr), to_tensor(lr)))
    print(f'training images ({len(pairs)}): {", ".join(sample_images.TRAIN_IMAGES)}')
    print(f'held-out images (never trained on): {", ".join(sample_images.HELD_OUT_IMAGES)}')
    sampler = PatchSampler(pairs, scale, args.seed)

    net = demo_network.build_network().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99))
    # Cosine decay to zero: a short run ends on small steps instead of on the noisy initial rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / args.iters)))
    report_every = max(1, args.iters // 10)
    window_mse: List[float] = []
    for step in range(1, args.iters + 1):
        lr_batch, hr_batch = sampler.batch(args.batch_size, args.patch_size)
        output = net(lr_batch)
        loss = (output - hr_batch).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window_mse.append(float((output.detach().clamp(0, 1) - hr_batch).pow(2).mean()))
        if step % report_every == 0 or step == args.iters:
            psnr = 10 * math.log10(1.0 / max(np.mean(window_mse), 1e-12))
            print(f'iter {step:5d}/{args.iters}  L1 {float(loss.detach()):.4f}  training PSNR (RGB, last '
                  f'{len(window_mse)} batches) {psnr:.2f} dB  {time.perf_counter() - start:.0f}s', flush=True)
            window_mse.clear()
    train_s = time.perf_counter() - start
    # CPU seconds of all threads: on a shared machine the wall time says little about the cost.
    cpu_s = time.process_time()

    net.eval()
    state = {key: value.detach().clone().contiguous() for key, value in net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'params': state}, args.out)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) after {train_s:.0f}s '
          f'({cpu_s:.0f} CPU seconds on {args.threads} threads), data preparation included')

    results = held_out_psnr(net, scale)
    print(f'\nheld-out PSNR-Y (crop {scale}):')
    print(f'  {"image":<12}{"EDSR":>8}{"bicubic":>9}{"gain":>7}')
    for name, (ours, bicubic) in results.items():
        print(f'  {name:<12}{ours:>8.2f}{bicubic:>9.2f}{ours - bicubic:>+7.2f}')
    mean_ours = float(np.mean([v[0] for v in results.values()]))
    mean_bicubic = float(np.mean([v[1] for v in results.values()]))
    print(f'  {"mean":<12}{mean_ours:>8.2f}{mean_bicubic:>9.2f}{mean_ours - mean_bicubic:>+7.2f}')
    if mean_ours <= mean_bicubic:
        print('warning: the network does not beat bicubic on the held-out images; train longer (--iters)')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
