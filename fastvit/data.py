"""Datasets: scikit-learn's bundled handwritten digits (the embedded default), as image tensors.

``load_digits`` (1,797 8×8 grey images of 0–9, shipped inside scikit-learn, no download) is
upsampled to ``img_size`` so that a ViT with a real patch grid can train on it in minutes on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

DIGITS_NUM_CLASSES = 10


def digits_tensors(img_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """Stratified train/test split of the digits as normalised [N, 1, img_size, img_size] float tensors.

    Returns:
        (train_images, train_labels, test_images, test_labels); images have zero mean and unit
        variance over the training split.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'fastvit[demo]'") from exc
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8 (the digits are 8x8), got {img_size!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    train_images, test_images = images[train_idx], images[test_idx]
    mean, std = train_images.mean(), train_images.std()
    return (train_images - mean) / std, labels[train_idx], (test_images - mean) / std, labels[test_idx]


def digits_datasets(img_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """(train, test) ``TensorDataset``s of the digits; see :func:`digits_tensors`."""
    train_x, train_y, test_x, test_y = digits_tensors(img_size, test_fraction, seed)
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero-padded): cheap augmentation for small data."""
    if max_shift <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=float(images.min()))
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(height)).unsqueeze(-1)  # [B, H, 1]
    cols = (offsets[:, 1, None] + torch.arange(width)).unsqueeze(1)  # [B, 1, W]
    batch_idx = torch.arange(batch)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch_idx, rows, cols].permute(0, 3, 1, 2).contiguous()
