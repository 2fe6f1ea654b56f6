"""Training engine and CLI: options, schedule, decay, freezing, init, checkpoints, resume, distributed.

Runs are tiny (a digits subset, a few updates) so the file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit import checkpoint as ckpt
from fastvit import train
from fastvit.data import SyntheticImages, build_data, parse_classes

pytest.importorskip("timm")
pytest.importorskip("sklearn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(classes="0-2", quiet=True)  # ~430 training images


def _run(tmp_path, name="run", **options):
    return train.run(train.default_args(**{**SMALL, "output": str(tmp_path / name), **options}))


def _weights(output) -> dict:
    return ckpt.read_weights(os.path.join(output, "checkpoint", ckpt.MODEL_FILE))[0]


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fastvit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


# ------------------------------------------------------------------------------------------------
# Data


def test_parse_classes():
    assert parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert parse_classes("5,7,9") == [5, 7, 9]
    assert parse_classes("0-1,8") == [0, 1, 8]
    assert parse_classes(None) is None
    with pytest.raises(ValueError, match="classes must look like"):
        parse_classes("a-b")


def test_digits_subset_is_relabelled_from_zero():
    data = build_data("digits", 16, "5-9")
    labels = torch.stack([data.train[i][1] for i in range(len(data.train))])
    assert data.num_classes == 5 and data.classes == ["5", "6", "7", "8", "9"]
    assert labels.min() == 0 and labels.max() == 4 and len(data.train) + len(data.test) == 896


def test_synthetic_images_are_a_function_of_the_index():
    data = SyntheticImages(8, 4, 3, 16, seed=1)
    image, label = data[3]
    assert torch.equal(image, data[3][0]) and label == data[3][1] and image.shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------
# Optimiser, schedule, decay, freezing


def _model(**kwargs):
    return fastvit.create_model("vit_digits_patch4_32", **kwargs)


def test_schedule_warms_up_then_decays_to_min_lr():
    args = train.default_args(epochs=4, warmup_epochs=1, lr=1e-3, min_lr=1e-5)
    optimizer = train.make_optimizer(_model(), args)
    scheduler = train.make_scheduler(optimizer, args, updates_per_epoch=10)
    lrs = []
    for update in range(41):
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-5)  # 1% of the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay
    assert lrs[40] == pytest.approx(1e-5, rel=1e-3)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = _model()
    optimizer = train.make_optimizer(model, train.default_args(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            exempt = param.ndim <= 1 or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if exempt else 0.05), name


def test_layer_decay_scales_lr_by_depth():
    model = _model()
    args = train.default_args(layer_decay=0.5, lr=1e-3, warmup_epochs=0)
    optimizer = train.make_optimizer(model, args)
    scheduler = train.make_scheduler(optimizer, args, updates_per_epoch=10)
    scheduler.step_update(0)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    depth = len(model.blocks)
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of[f"blocks.{depth - 1}.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5**depth)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5 ** (depth + 1))


def test_freeze_backbone_trains_only_the_head(tmp_path):
    pretrained = _run(tmp_path, "pre", epochs=1, max_steps=2)
    probe = _run(tmp_path, "probe", epochs=1, max_steps=3, init=pretrained.output, freeze_backbone=True, classes="3-4")
    before, after = _weights(pretrained.output), _weights(probe.output)
    for name, value in after.items():
        if name.startswith("head."):
            assert value.shape[0] == 2
        else:
            assert torch.equal(value, before[name]), f"{name} changed under --freeze-backbone"
    trainable = [n for n, p in probe.model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]


def test_init_adapts_head_channels_and_position_embedding(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=1000, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0
    )
    path = tmp_path / "timm_vit.pth"
    torch.save(source.state_dict(), path)
    model = _model(img_size=48)  # 1 channel, 10 classes, 12x12 grid
    notes = train.load_init_weights(model, str(path))
    assert any("new head" in n for n in notes)
    assert any("3 to 1 input channels" in n for n in notes)
    assert any("resampled" in n for n in notes)
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))


# ------------------------------------------------------------------------------------------------
# Every option reaches the training loop

OPTION_SETS = [
    dict(opt="sgd", lr=0.05),
    dict(opt="lamb"),
    dict(mixup=0.8),
    dict(cutmix=1.0),
    dict(ema=0.9),
    dict(amp="bf16"),
    dict(amp="fp16"),
    dict(grad_accum=2),
    dict(grad_checkpointing=True),
    dict(drop_path=0.1, label_smoothing=0.0, clip_grad=0.0),
    dict(layer_decay=0.75, weight_decay=0.1, warmup_epochs=0.5),
    dict(backend="torch"),
    dict(data="synthetic", synthetic_size=64, classes=None, img_size=16),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_reaches_the_training_loop(tmp_path, options):
    result = _run(tmp_path, epochs=2, max_steps=2, batch_size=16, **options)
    (row,) = result.history
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0.0 <= row["test_top1"] <= 1.0
    state = ckpt.load_checkpoint(result.output)["state"]
    assert state["num_updates"] == 2
    if options.get("ema"):
        assert "ema_test_top1" in row and os.path.exists(os.path.join(result.output, "checkpoint", ckpt.EMA_FILE))
    if options.get("grad_accum") == 2:
        assert state["args"]["grad_accum"] == 2


@pytest.mark.parametrize("name", ["vit_base_patch16_dinov3", "eva02_base_patch14_448"])
def test_eva_presets_train_save_and_load(tmp_path, monkeypatch, name):
    """--model takes timm's Eva-class presets (RoPE): built as fastvit.Eva, recorded as such in the checkpoint, and
    rebuilt by load_run. The preset is shrunk in place (same knobs, 1 block, width 32) to keep the run small."""
    from fastvit.eva import EVA_PRESETS

    monkeypatch.setitem(EVA_PRESETS, name, {**EVA_PRESETS[name], "depth": 1, "embed_dim": 32, "num_heads": 2})
    patch = EVA_PRESETS[name]["patch_size"]
    result = _run(tmp_path, model=name, img_size=2 * patch, epochs=1, max_steps=2, batch_size=8)
    model = fastvit.load_run(result.output)
    assert type(model).__name__ == "Eva" and model.rope.config is not None
    assert ckpt.load_checkpoint(result.output)["metadata"]["config"]["model_class"] == "Eva"
    assert model(torch.randn(2, 1, 2 * patch, 2 * patch)).shape == (2, 3)  # digits: 1 channel, classes 0-2


def test_compile_reaches_the_training_loop(tmp_path):
    result = _run(tmp_path, epochs=1, max_steps=1, batch_size=16, compile=True)
    assert len(result.history) == 1


def test_image_folder_data(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cats", "dogs"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    result = _run(
        tmp_path,
        data=str(tmp_path / "images"),
        classes=None,
        img_size=16,
        batch_size=4,
        epochs=1,
        model="vit_tiny_patch16_224",
    )
    assert result.data.classes == ["cats", "dogs"] and result.model.in_chans == 3


def test_outputs_metrics_csv_json_png(tmp_path):
    result = _run(tmp_path, epochs=2, max_steps=4, batch_size=32)
    files = set(os.listdir(result.output))
    assert {"metrics.json", "metrics.csv", "curves.png", "checkpoint"} <= files
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rows[0]["epoch"] == 1 and {"train_loss", "test_top1", "test_top5", "lr", "img_per_s"} <= set(rows[0])


# ------------------------------------------------------------------------------------------------
# Checkpoints


def test_resume_is_bit_identical(tmp_path):
    options = dict(epochs=3, batch_size=32, mixup=0.2, ema=0.99)
    full = _run(tmp_path, "full", **options)
    _run(tmp_path, "part", stop_after=2, **options)
    resumed = _run(tmp_path, "part", resume=str(tmp_path / "part"), **options)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    for name, value in _weights(full.output).items():
        assert torch.equal(value, _weights(resumed.output)[name]), name


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    result = _run(tmp_path, epochs=1, max_steps=1)
    directory = os.path.join(result.output, "checkpoint")
    model_file = os.path.join(directory, ckpt.MODEL_FILE)
    with open(model_file, "rb") as f:
        data = f.read()
    with open(model_file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ckpt.load_checkpoint(result.output)
    with open(model_file, "wb") as f:
        f.write(data)
    state_file = os.path.join(directory, ckpt.STATE_FILE)
    with open(state_file, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ckpt.load_checkpoint(result.output)
    rc = _cli("train", "--classes", "0-2", "--output", str(tmp_path / "again"), "--resume", result.output, "--quiet")
    assert rc.returncode == 2 and "truncated or corrupted" in rc.stderr and "Traceback" not in rc.stderr


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    result = _run(tmp_path, epochs=1, max_steps=1)
    before = _weights(result.output)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(os.path.join(result.output, "checkpoint"), {"x": torch.zeros(1)}, {}, {})
    loaded = ckpt.load_checkpoint(result.output)
    for name, value in before.items():
        assert torch.equal(loaded["model"][name], value)


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "vit_gigantic"], "--model 'vit_gigantic' is not a preset"),
        (["--model", "naflexvit_base_patch16_gap"], "does not train NaFlexViT models yet"),
        (["--data", "/no/such/dir"], "--data '/no/such/dir' is not 'digits', 'synthetic' or an existing directory"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--img-size", "30"], "--img-size 30 is not divisible by the patch size 4"),
        (["--opt", "adam"], "invalid choice: 'adam'"),
        (["--mixup", "0.2", "--batch-size", "15"], "need an even --batch-size"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_code_2(args, message, capsys):
    # In process (the argument checks run before any training; a subprocess would spend ~7 s importing torch):
    # test_cli_unknown_command runs the real `python -m fastvit` entry point.
    from fastvit.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["train", *args])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert message in stderr and "Traceback" not in stderr


def test_cli_mixed_resolution_training_end_to_end(tmp_path):
    """--sizes: training batches of mixed sizes run packed; the saved model takes any size and lists of images."""
    output = tmp_path / "packed"
    args = ["--sizes", "16,24,32x16", "--classes", "0-2", "--epochs", "1", "--max-steps", "3", "--batch-size", "16"]
    result = _cli("train", *args, "--output", str(output), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "training packed at sizes 16,24,32x16" in result.stdout
    (row,) = json.loads((output / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0.0 <= row["test_top1"] <= 1.0
    model = fastvit.load_run(str(output)).eval()
    assert model.dynamic_img_size
    with torch.no_grad():
        assert model([torch.randn(1, 16, 16), torch.randn(1, 32, 16)]).shape == (2, 3)


def test_cli_unknown_command():
    result = _cli("serve")
    assert result.returncode == 2 and "invalid choice: 'serve'" in result.stderr


def test_eval_predict_explain_commands(tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    assert _cli("train", "--epochs", "3", "--classes", "0-2", "--output", str(out), "--quiet").returncode == 0
    result = _cli("eval", "--init", str(out), "--classes", "0-2")
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "img/s" in result.stdout

    data = build_data("digits", 32, "0-2", shift=0)
    image, label = data.test[0]
    pixels = (image[0] * data.std[0] + data.mean[0]).clamp(0, 1) * 255
    png = tmp_path / "digit.png"
    Image.fromarray(pixels.round().byte().numpy(), mode="L").save(png)
    result = _cli("predict", str(png), "--init", str(out), "--topk", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{png}: ") and "%" in result.stdout

    result = _cli("explain", str(png), "--init", str(out), "--output", str(tmp_path / "rollout.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rollout.png").stat().st_size > 5_000


def test_attention_rollout_is_a_distribution_over_patches():
    from fastvit.explain import attention_rollout

    model = _model().eval()
    heat = attention_rollout(model, torch.randn(2, 1, 32, 32))
    assert heat.shape == (2, 8, 8)
    torch.testing.assert_close(heat.sum(dim=(1, 2)), torch.ones(2))
    assert (heat >= 0).all()


def test_transfer_command_prints_the_table(tmp_path):
    result = _cli("transfer", "--pretrain-epochs", "1", "--epochs", "1", "--output", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    for row in ("pre-train on 0-4", "linear probe", "full fine-tune", "from scratch"):
        assert f"| {row} |" in result.stdout
    assert (tmp_path / "transfer.md").exists()


# ------------------------------------------------------------------------------------------------
# Distributed (2 gloo processes on CPU)


def _torchrun(*args, nproc=2):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "fastvit",
        "train",
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # DDP's bucket views need each gradient in its parameter's layout (the patch-embedding dW once was not)
    assert "Grad strides do not match bucket view strides" not in result.stderr, result.stderr[-4000:]
    return result


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, sharding):
    common = ["--classes", "0-2", "--shift", "0", "--max-steps", "4", "--quiet"]
    _torchrun(
        "--batch-size", "16", "--output", str(tmp_path / "two"), *common, *(["--fsdp"] if sharding == "fsdp" else [])
    )
    single = _cli("train", "--batch-size", "32", "--output", str(tmp_path / "one"), *common)
    assert single.returncode == 0, single.stderr
    two, one = _weights(str(tmp_path / "two")), _weights(str(tmp_path / "one"))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_two_ranks_resume(tmp_path):
    common = ["--classes", "0-2", "--epochs", "2", "--batch-size", "16", "--quiet"]
    _torchrun("--output", str(tmp_path / "full"), *common)
    _torchrun("--output", str(tmp_path / "part"), "--stop-after", "1", *common)
    _torchrun("--output", str(tmp_path / "part"), "--resume", str(tmp_path / "part"), *common)
    full, part = _weights(str(tmp_path / "full")), _weights(str(tmp_path / "part"))
    for name, value in full.items():
        assert torch.equal(part[name], value), name
    history = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
