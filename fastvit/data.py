"""Datasets for training and evaluation: the bundled digits, an ImageFolder directory, or synthetic images.

``--data`` values:
  ``digits``            scikit-learn's bundled handwritten digits (1,797 8×8 grey images of 0–9, no
                        download), upsampled to ``img_size``; ``--classes 0-4`` keeps a subset (labels
                        renumbered from 0), which is how the transfer example splits 0–4 from 5–9.
  ``synthetic``         random images with random labels (for throughput runs; nothing to learn).
  a directory           ``torchvision.datasets.ImageFolder``: ``DIR/train`` and ``DIR/val`` if present,
                        else one folder split 80/20 with a fixed seed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

DIGITS_NUM_CLASSES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class DataBundle:
    """A train/test pair and what a model and a predictor need to know about it."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str]
    mean: list[float]  # per-channel normalisation of [0, 1] pixels, for prediction on image files
    std: list[float]
    batch_augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to training batches


def parse_classes(spec: str | None) -> list[int] | None:
    """'0-4' or '5,6,7' or '0-2,9' -> sorted class indices; None -> all."""
    if spec is None or spec == "":
        return None
    classes: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                if low > high:
                    raise ValueError
                classes.update(range(low, high + 1))
            else:
                classes.add(int(part))
    except ValueError:
        raise ValueError(f"classes must look like '0-4' or '1,3,5', got {spec!r}") from None
    return sorted(classes)


def digits_tensors(img_size: int = 32, test_fraction: float = 0.2, seed: int = 0, classes: list[int] | None = None):
    """Stratified train/test split of the digits as normalised [N, 1, img_size, img_size] float tensors.

    Returns:
        (train_images, train_labels, test_images, test_labels, mean, std): images are standardised
        with the training split's pixel mean/std (``mean``/``std`` in units of [0, 1] pixels); with
        ``classes`` only those digits are kept and labelled 0..k-1 in the given order.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'fastvit[demo]'") from exc
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8 (the digits are 8x8), got {img_size!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16 -> [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < DIGITS_NUM_CLASSES]
        if bad or not classes:
            raise ValueError(f"digits classes must be in 0..9, got {classes}")
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
        remap = torch.full((DIGITS_NUM_CLASSES,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        labels = remap[labels]
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    train_images, test_images = images[train_idx], images[test_idx]
    mean, std = train_images.mean().item(), train_images.std().item()
    return (
        (train_images - mean) / std,
        labels[train_idx],
        (test_images - mean) / std,
        labels[test_idx],
        mean,
        std,
    )


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (padded with the minimum): augmentation for small data."""
    if max_shift <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=float(images.min()))
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(height)).unsqueeze(-1).to(images.device)  # [B, H, 1]
    cols = (offsets[:, 1, None] + torch.arange(width)).unsqueeze(1).to(images.device)  # [B, 1, W]
    batch_idx = torch.arange(batch, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch_idx, rows, cols].permute(0, 3, 1, 2).contiguous()


class SyntheticImages(Dataset):
    """Deterministic random images and labels (a function of the index): throughput runs, no disk, no learning."""

    def __init__(self, num_samples: int, num_classes: int, in_chans: int, img_size: int, seed: int = 0) -> None:
        self.num_samples, self.num_classes, self.in_chans, self.img_size, self.seed = (
            num_samples,
            num_classes,
            in_chans,
            img_size,
            seed,
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(self.in_chans, self.img_size, self.img_size, generator=generator)
        label = int(torch.randint(0, self.num_classes, (), generator=generator))
        return image, label


def image_transforms(img_size: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans: int = 3):
    """torchvision transforms: RandomResizedCrop + flip to train; resize (crop ratio 0.875) + center crop to eval."""
    from torchvision import transforms

    steps = [transforms.Grayscale(num_output_channels=1)] if in_chans == 1 else []
    if train:
        steps += [transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip()]
    else:
        steps += [transforms.Resize(int(round(img_size / 0.875))), transforms.CenterCrop(img_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def build_data(
    source: str,
    img_size: int,
    classes: str | None = None,
    seed: int = 0,
    shift: int = 2,
    synthetic_size: int = 1024,
    synthetic_classes: int = 10,
) -> DataBundle:
    """The train/test datasets named by ``source`` ('digits', 'synthetic' or an ImageFolder directory)."""
    if source == "digits":
        class_list = parse_classes(classes)
        train_x, train_y, test_x, test_y, mean, std = digits_tensors(img_size, seed=seed, classes=class_list)
        names = [str(c) for c in (class_list or range(DIGITS_NUM_CLASSES))]
        return DataBundle(
            name="digits" + (f"[{classes}]" if classes else ""),
            train=TensorDataset(train_x, train_y),
            test=TensorDataset(test_x, test_y),
            num_classes=len(names),
            in_chans=1,
            img_size=img_size,
            classes=names,
            mean=[mean],
            std=[std],
            batch_augment=(lambda batch: random_shift(batch, shift)) if shift > 0 else None,
        )
    if classes:
        raise ValueError("--classes selects digits only; for an ImageFolder keep the class folders you want")
    if source == "synthetic":
        train = SyntheticImages(synthetic_size, synthetic_classes, 3, img_size, seed)
        test = SyntheticImages(max(synthetic_size // 8, 16), synthetic_classes, 3, img_size, seed + 1)
        names = [str(i) for i in range(synthetic_classes)]
        return DataBundle("synthetic", train, test, synthetic_classes, 3, img_size, names, [0.0] * 3, [1.0] * 3)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--data {source!r}: not 'digits', 'synthetic' or an existing directory")
    return _image_folder(source, img_size, seed)


def _image_folder(root: str, img_size: int, seed: int) -> DataBundle:
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    train_tf, test_tf = image_transforms(img_size, train=True), image_transforms(img_size, train=False)
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train, test = ImageFolder(train_dir, transform=train_tf), ImageFolder(val_dir, transform=test_tf)
        if train.classes != test.classes:
            raise ValueError(f"{root}: train/ and val/ have different class folders")
        classes = train.classes
    else:
        full_train, full_test = ImageFolder(root, transform=train_tf), ImageFolder(root, transform=test_tf)
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, int(0.8 * len(order)))
        train, test = Subset(full_train, order[:cut]), Subset(full_test, order[cut:])
        classes = full_train.classes
    return DataBundle(
        f"imagefolder:{root}", train, test, len(classes), 3, img_size, classes, list(IMAGENET_MEAN), list(IMAGENET_STD)
    )
