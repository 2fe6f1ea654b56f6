"""A small, complete training loop: AdamW, linear warm-up + cosine decay, label smoothing, tqdm progress.

Used by the demo (``python -m fastvit demo``); everything here is standard PyTorch (optimiser,
schedulers, loss) so the loop stays short and its behaviour unsurprising.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastvit.data import random_shift


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    max_shift: int = 2  # random-translation augmentation, pixels
    clip_grad: float | None = 1.0
    seed: int = 0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and ``model.no_weight_decay()`` (pos/cls embeddings)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 1% of the base LR, then cosine decay to 0, stepped once per iteration."""
    cosine_steps = max(1, total_steps - warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cosine_steps)
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on a labelled image tensor."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train(was_training)
    return total_loss / len(labels), correct / len(labels)


def fit(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: TrainConfig,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` in place; returns one dict of metrics per epoch."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    steps_per_epoch = math.ceil(len(train_labels) / config.batch_size)
    scheduler = warmup_cosine(optimizer, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history = []
    bar = tqdm(total=config.epochs * steps_per_epoch, disable=not progress, unit="step", dynamic_ncols=True)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        epoch_loss, seen, start_time = 0.0, 0, time.perf_counter()
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            x = random_shift(train_images[idx], config.max_shift, generator).to(device)
            y = train_labels[idx].to(device)
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item() * len(idx)
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elapsed = time.perf_counter() - start_time
        test_loss, test_acc = evaluate(model, test_images, test_labels)
        history.append(
            dict(
                epoch=epoch,
                train_loss=epoch_loss / seen,
                test_loss=test_loss,
                test_acc=test_acc,
                lr=scheduler.get_last_lr()[0],
                train_img_per_s=seen / elapsed,
            )
        )
        bar.set_postfix(epoch=epoch, loss=f"{epoch_loss / seen:.3f}", test_acc=f"{test_acc:.3f}")
    bar.close()
    return history


def save_safetensors(model: nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights as safetensors atomically (temp file + rename: a crash loses nothing)."""
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """PNG with the loss curves and the test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (label-smoothed)")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["test_acc"] for h in history], color="C2")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy", ylim=(0, 100))
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
