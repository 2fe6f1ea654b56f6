"""Datasets for training and evaluation, and the preprocessing that goes with a model.

``--data`` values:
  ``digits``            scikit-learn's bundled handwritten digits (1,797 8×8 grey images of 0–9, light ink on
                        a dark background, no download), upsampled to ``img_size``; ``--classes 0-4`` keeps a
                        subset (labels renumbered from 0), which is how the transfer example splits 0–4 from 5–9.
  ``synthetic``         random images with random labels (for throughput runs; nothing to learn).
  a directory           ``torchvision.datasets.ImageFolder``: ``DIR/train`` and ``DIR/val`` if present,
                        else one folder split 80/20 with the run's seed.

Preprocessing travels with the model: ``model.pretrained_cfg`` holds timm's data config (input size,
interpolation, crop, mean/std), and :func:`create_transform` (or timm's ``resolve_model_data_config`` +
``create_transform``) turns it into the transform for image files, used by ``eval``, ``predict`` and ``explain``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

DIGITS_NUM_CLASSES = 10
TEST_FRACTION = 0.2  # held-out share of the digits, and of an ImageFolder without train/ and val/
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")  # timm's


@dataclasses.dataclass
class DataBundle:
    """A train/test pair and what a model and a predictor need to know about it.

    ``data_config`` is the preprocessing of the test images in timm's form (see :func:`resolve_data_config`);
    ``provenance`` says where the split came from (source, class selection, split seed), so that evaluation
    can use the same split.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str]
    data_config: dict
    provenance: dict
    batch_augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to training batches

    @property
    def mean(self) -> list[float]:
        return list(self.data_config["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.data_config["std"])


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


def digits_tensors(
    img_size: int = 32,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    classes: list[int] | None = None,
    mean_std: tuple[float, float] | None = None,
):
    """Stratified train/test split of the digits as normalised [N, 1, img_size, img_size] float tensors.

    Returns:
        (train_images, train_labels, test_images, test_labels, mean, std): images are standardised with
        ``mean_std`` when given (a trained model's), else with the training split's pixel mean/std (``mean``/
        ``std`` in units of [0, 1] pixels); with ``classes`` only those digits are kept and labelled 0..k-1 in
        the given order.
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
    if mean_std is None:
        mean, std = train_images.mean().item(), train_images.std().item()
    else:
        mean, std = mean_std
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


# ------------------------------------------------------------------------------------------------
# Preprocessing that travels with the model


def resolve_data_config(model_or_cfg: nn.Module | Mapping) -> dict:
    """timm's data config (``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``) of a model or of a ``pretrained_cfg``-style dict.

    For a model, ``input_size`` comes from the model itself (its channels and ``patch_embed.img_size``), the
    rest from ``model.pretrained_cfg`` (timm's ViT defaults where absent); timm's own
    ``timm.data.resolve_model_data_config`` gives the same for fastvit models.
    """
    from fastvit.model import check_pretrained_cfg  # the model module builds on this one

    if isinstance(model_or_cfg, Mapping):
        cfg = dict(model_or_cfg)
        if "input_size" not in cfg:
            raise ValueError("a data config needs 'input_size' (C, H, W)")
        input_size = tuple(cfg["input_size"])
    elif isinstance(model_or_cfg, nn.Module):
        cfg = dict(getattr(model_or_cfg, "pretrained_cfg", None) or {})
        patch_embed = getattr(model_or_cfg, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "img_size"):
            in_chans = getattr(model_or_cfg, "in_chans", None) or patch_embed.proj.in_channels
            input_size = (in_chans, *tuple(patch_embed.img_size))
        else:
            input_size = tuple(cfg.get("input_size") or (3, 224, 224))
    else:
        raise TypeError(f"expected a model or a data config dict, got {type(model_or_cfg).__name__}")
    if len(input_size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_size):
        raise ValueError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")
    checked = check_pretrained_cfg(cfg, input_size[0])
    return {"input_size": input_size, **{key: checked[key] for key in DATA_CONFIG_KEYS[1:]}}


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}


def channel_conversion(mode: str, in_chans: int) -> str | None:
    """A note when turning a PIL image of ``mode`` into ``in_chans`` channels changes colour to grey or back
    (dropping an alpha channel or expanding a palette is not worth one); None otherwise."""
    grey_image, grey_model = mode in _GREY_MODES, in_chans == 1
    if grey_image == grey_model:
        return None
    if grey_model:
        return f"a colour ({mode}) image was converted to 1 grey channel: the model takes 1-channel images"
    return f"a grey ({mode}) image was repeated into {in_chans} channels: the model takes {in_chans}-channel images"


class ConvertChannels:
    """PIL image -> the model's channels ('L', 'RGB' or 'RGBA'); warns (once per kind) on colour <-> grey."""

    def __init__(self, in_chans: int) -> None:
        if in_chans not in _MODE_FOR_CHANNELS:
            raise ValueError(f"images can be converted to 1, 3 or 4 channels, not {in_chans}")
        self.in_chans, self.mode = in_chans, _MODE_FOR_CHANNELS[in_chans]

    def __call__(self, image):
        if image.mode == self.mode:
            return image
        note = channel_conversion(image.mode, self.in_chans)
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


def create_transform(model_or_cfg: nn.Module | Mapping, train: bool = False) -> Callable:
    """The transform from a PIL image to the model's input tensor ``[C, H, W]``, from its data config.

    Evaluation (``train=False``): convert channels, resize to ``size / crop_pct`` with the config's
    interpolation, centre-crop (``crop_mode='squash'``: resize without keeping the aspect ratio), scale to
    [0, 1], normalise with its mean/std: timm's ``create_transform`` on :func:`resolve_data_config`, after a
    channel conversion that warns when it changes colour to grey or back. Training (``train=True``): timm's
    training transform (random resized crop, flip, colour jitter) with the same interpolation and mean/std.
    """
    from timm.data import create_transform as timm_create_transform
    from torchvision import transforms

    cfg = resolve_data_config(model_or_cfg)
    timm_transform = timm_create_transform(
        input_size=cfg["input_size"],
        is_training=train,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )
    return transforms.Compose([ConvertChannels(cfg["input_size"][0]), *timm_transform.transforms])


def read_image(path: str):
    """A decoded PIL image; ``ValueError`` naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Datasets


def build_data(
    source: str,
    img_size: int | tuple[int, int],
    classes: str | None = None,
    seed: int = 0,
    shift: int = 2,
    synthetic_size: int = 1024,
    synthetic_classes: int = 10,
    data_config: Mapping | None = None,
) -> DataBundle:
    """The train/test datasets named by ``source`` ('digits', 'synthetic' or an ImageFolder directory).

    Args:
        data_config: the model's data config (``pretrained_cfg``). An ImageFolder's images are transformed as it
            says (channels, interpolation, crop, mean/std; training with timm's augmentation); the digits are
            normalised with its mean/std when given (evaluating a trained model), else with the training
            split's own statistics (training).
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if source in ("digits", "synthetic"):
        if height != width:
            raise ValueError(f"{source} images are square, the model takes {height}x{width}")
        img_size = height
    if source == "digits":
        class_list = parse_classes(classes)
        mean_std = None
        if data_config is not None:
            mean_std = (float(data_config["mean"][0]), float(data_config["std"][0]))
        train_x, train_y, test_x, test_y, mean, std = digits_tensors(
            img_size, seed=seed, classes=class_list, mean_std=mean_std
        )
        names = [str(c) for c in (class_list or range(DIGITS_NUM_CLASSES))]
        config = dict(
            input_size=(1, img_size, img_size),
            interpolation="bilinear",
            mean=(mean,),
            std=(std,),
            crop_pct=1.0,
            crop_mode="squash",
        )
        return DataBundle(
            name="digits" + (f"[{classes}]" if classes else ""),
            train=TensorDataset(train_x, train_y),
            test=TensorDataset(test_x, test_y),
            num_classes=len(names),
            in_chans=1,
            img_size=img_size,
            classes=names,
            data_config=config,
            provenance=dict(source="digits", classes=classes or None, split_seed=seed, test_fraction=TEST_FRACTION),
            batch_augment=(lambda batch: random_shift(batch, shift)) if shift > 0 else None,
        )
    if classes:
        raise ValueError("--classes selects digits only; for an ImageFolder keep the class folders you want")
    if source == "synthetic":
        train = SyntheticImages(synthetic_size, synthetic_classes, 3, img_size, seed)
        test = SyntheticImages(max(synthetic_size // 8, 16), synthetic_classes, 3, img_size, seed + 1)
        names = [str(i) for i in range(synthetic_classes)]
        config = dict(
            input_size=(3, img_size, img_size),
            interpolation="bilinear",
            mean=(0.0,) * 3,
            std=(1.0,) * 3,
            crop_pct=1.0,
            crop_mode="squash",
        )
        provenance = dict(source="synthetic", seed=seed, size=synthetic_size)
        return DataBundle("synthetic", train, test, synthetic_classes, 3, img_size, names, config, provenance)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--data {source!r}: not 'digits', 'synthetic' or an existing directory")
    return _image_folder(source, (height, width), seed, data_config)


def _image_folder(root: str, img_size: tuple[int, int], seed: int, data_config: Mapping | None) -> DataBundle:
    from torchvision.datasets import ImageFolder

    from fastvit.model import default_pretrained_cfg

    base = dict(data_config) if data_config is not None else default_pretrained_cfg(3)
    in_chans = tuple(base["input_size"])[0] if base.get("input_size") else 3  # the model's channels
    config = resolve_data_config({**base, "input_size": (in_chans, *img_size)})
    train_tf, test_tf = create_transform(config, train=True), create_transform(config)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    provenance = dict(source=os.path.abspath(root))
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train = ImageFolder(train_dir, transform=train_tf, loader=read_image)
        test = ImageFolder(val_dir, transform=test_tf, loader=read_image)
        if train.classes != test.classes:
            raise ValueError(f"{root}: train/ and val/ have different class folders")
        classes = train.classes
        provenance["split"] = "train/val"
    else:
        full_train = ImageFolder(root, transform=train_tf, loader=read_image)
        full_test = ImageFolder(root, transform=test_tf, loader=read_image)
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, int((1 - TEST_FRACTION) * len(order)))
        train, test = Subset(full_train, order[:cut]), Subset(full_test, order[cut:])
        classes = full_train.classes
        provenance.update(split_seed=seed, test_fraction=TEST_FRACTION)
    size = img_size[0] if img_size[0] == img_size[1] else img_size
    return DataBundle(f"imagefolder:{root}", train, test, len(classes), in_chans, size, classes, config, provenance)
