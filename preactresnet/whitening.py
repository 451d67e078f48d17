"""Patch-whitening initialisation of a network's first convolution (airbench, Jordan 2024).

The stem's filters become the leading eigenvectors of the covariance of the training images' k x k
patches, each scaled by 1/sqrt(eigenvalue) and paired with its negative, so that the stem's outputs
start decorrelated and of unit variance. The architecture is unchanged and the filters keep training.
Written by hand: no library initialises a conv from data this way.
"""

from __future__ import annotations

import torch
import torch.nn as nn

WHITEN_IMAGES = 5000  # airbench's sample: enough for a stable 27 x 27 covariance
WHITEN_EPS = 5e-4  # added to the eigenvalues: bounds the gain of the near-null directions
WHITEN_CHUNK = 512  # images per product: 460k patches, exact enough in fp32 and small in memory


def stem_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution that reads the RGB image (every zoo model has one)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return module
    raise ValueError(f"{type(model).__name__} has no 3-channel stem convolution to whiten; drop --whiten-stem")


def patch_whitening(images: torch.Tensor, kernel: tuple[int, int], eps: float = WHITEN_EPS) -> torch.Tensor:
    """Filters (2 * c*kh*kw, c, kh, kw), strongest direction first: each eigenvector, then all negatives."""
    c = images.shape[1]
    kh, kw = kernel
    cov, count = torch.zeros(c * kh * kw, c * kh * kw, dtype=torch.float64), 0
    for part in images.split(WHITEN_CHUNK):  # fp32 products summed in fp64: 5x faster than all of it in fp64
        patches = part.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
        cov += (patches.T @ patches).double()
        count += len(patches)
    cov /= count
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)).T.reshape(-1, c, kh, kw)
    return torch.cat([filters, -filters]).float()


@torch.no_grad()
def whiten_stem_(model: nn.Module, train_images: torch.Tensor, mean, std, seed: int = 0) -> int:
    """Initialise the stem from `train_images` (uint8 N x 3 x H x W); returns the filters set.

    With more output channels than 2 x (patch size) the rest keep their random init; with fewer,
    the strongest directions are kept (paired with their negatives).
    """
    conv = stem_conv(model)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_images), generator=g)[:WHITEN_IMAGES]
    x = train_images[pick.to(train_images.device)].cpu().float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    filters = patch_whitening(x, conv.kernel_size)
    half = min(conv.out_channels // 2, filters.shape[0] // 2)
    n_dir = filters.shape[0] // 2
    chosen = torch.cat([filters[:half], filters[n_dir : n_dir + half]])
    conv.weight[: 2 * half] = chosen.to(conv.weight)
    return 2 * half
