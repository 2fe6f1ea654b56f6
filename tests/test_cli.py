"""The command line as a user meets it: options, errors, resume, output folders, eval/predict/explain, extras.

Most commands run in-process through ``fastvit.__main__.main`` (what ``python -m fastvit`` calls), checking
exit codes, printed lines and written files; a few run as subprocesses, as a user would, where the process
boundary matters (tracebacks, missing optional packages). Runs are tiny (digits 0-2, 1-2 epochs).
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
from fastvit.__main__ import main

pytest.importorskip("sklearn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--classes", "0-2", "--quiet", "-b", "32", "--warmup-epochs", "1"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``python -m fastvit ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "error: " in lines[0], err
    assert fragment in lines[0], (fragment, err)


def subprocess_cli(*argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastvit", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and lose a lot when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A 2-epoch run on digits 0-2 (seed 0): its output folder."""
    output = tmp_path_factory.mktemp("cli") / "run"
    assert train.main([*SMALL, "--epochs", "2", "--output", str(output)]) == 0
    return str(output)


@pytest.fixture
def digit_png(tmp_path) -> str:
    """A test-split digit of classes 0-2 as a grey 32x32 PNG (light ink on a dark background)."""
    from PIL import Image

    from fastvit.data import build_data

    data = build_data("digits", 32, "0-2", shift=0)
    pixels = (data.test[0][0][0] * data.std[0] + data.mean[0]).clamp(0, 1) * 255
    path = tmp_path / "digit.png"
    Image.fromarray(pixels.round().byte().numpy(), mode="L").save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Every numeric option at 0, negative, NaN, inf and an absurd magnitude: a one-line error (exit 2) or a
# documented meaning (OK: the meaning is in the option's --help text or the README).

OK, INT = "ok", "invalid int value"
VALUES = ("0", "-1", "nan", "inf")
HUGE_INT, HUGE_FLOAT = "1000000000000", "1e30"

# option: outcome at 0, -1, nan, inf, and at the absurd magnitude (10^12 for ints, 1e30 for floats)
TRAIN_TABLE = {
    "--epochs": (">= 1", ">= 1", INT, INT, OK),  # the schedule spans 10^12 epochs (stop with --max-steps)
    "--batch-size": (">= 1", ">= 1", INT, INT, OK),  # larger than the data: one batch per epoch
    "--grad-accum": (">= 1", ">= 1", INT, INT, OK),  # more than the batches: one update per epoch
    "--img-size": ("in [1, 8192]", "in [1, 8192]", INT, INT, "in [1, 8192]"),
    "--shift": (OK, ">= 0", INT, INT, "must be smaller than the image"),  # 0 = no augmentation
    "--workers": (OK, "in [0, 256]", INT, INT, "in [0, 256]"),  # 0 = load in the main process
    "--synthetic-size": ("in [1, 100000000]", "in [1, 100000000]", INT, INT, "in [1, 100000000]"),
    "--seed": (OK, "in [0, 4294967295]", INT, INT, "in [0, 4294967295]"),
    "--max-steps": (">= 1", ">= 1", INT, INT, OK),  # never reached
    "--stop-after": (">= 1", ">= 1", INT, INT, OK),  # never reached
    "--lr": ("> 0", "> 0", "> 0", "> 0", OK),  # diverges: a one-line error after the epoch (tested below)
    "--min-lr": (OK, ">= 0", ">= 0", ">= 0", "is above --lr"),  # 0 = cosine to zero
    "--warmup-epochs": (OK, ">= 0", ">= 0", ">= 0", OK),  # 0 = none; longer than the run: a warning
    "--weight-decay": (OK, ">= 0", ">= 0", ">= 0", OK),  # 0 = none; absurd: diverges (one-line error)
    "--momentum": (OK, "in [0, 1)", "in [0, 1)", "in [0, 1)", "in [0, 1)"),
    "--layer-decay": ("in (0, 1]", "in (0, 1]", "in (0, 1]", "in (0, 1]", "in (0, 1]"),
    "--label-smoothing": (OK, "in [0, 1)", "in [0, 1)", "in [0, 1)", "in [0, 1)"),
    "--drop-path": (OK, "in [0, 1)", "in [0, 1)", "in [0, 1)", "in [0, 1)"),
    "--mixup": (OK, ">= 0", ">= 0", ">= 0", OK),  # 0 = off; a huge alpha mixes 50/50
    "--cutmix": (OK, ">= 0", ">= 0", ">= 0", OK),
    "--clip-grad": (OK, ">= 0", ">= 0", ">= 0", OK),  # 0 = no clipping; huge = never clips
    "--ema": ("in (0, 1)", "in (0, 1)", "in (0, 1)", "in (0, 1)", "in (0, 1)"),
}
INT_OPTIONS = {
    "--epochs",
    "--batch-size",
    "--grad-accum",
    "--img-size",
    "--shift",
    "--workers",
    "--synthetic-size",
    "--seed",
    "--max-steps",
    "--stop-after",
}


def _table_cases():
    for option, outcomes in TRAIN_TABLE.items():
        huge = HUGE_INT if option in INT_OPTIONS else HUGE_FLOAT
        for value, outcome in zip((*VALUES, huge), outcomes):
            yield pytest.param(option, value, outcome, id=f"{option}={value}")


def test_every_numeric_train_option_is_in_the_table():
    parser = train.make_parser()
    numeric = {
        next(o for o in action.option_strings if o.startswith("--"))
        for action in parser._actions
        if action.type in (int, float)
    }
    assert numeric == set(TRAIN_TABLE)
    assert {o for o in numeric if parser._option_string_actions[o].type is int} == INT_OPTIONS


@pytest.mark.parametrize("option, value, outcome", list(_table_cases()))
def test_train_numeric_option_table(tmp_path, capsys, option, value, outcome):
    # The checks only: parse the options as the CLI does, then prepare_args (what train runs before training).
    argv = [option, value, "--output", str(tmp_path / "out")]
    if option == "--ema":
        argv += ["--classes", "0-2"]
    parser = train.make_parser()
    try:
        args = parser.parse_args(argv)
        train.prepare_args(args, set(), parser)
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    if outcome == OK:
        assert code == 0, err
    else:
        assert_one_line_error(code, err, outcome)
        if outcome not in (INT,) and value in ("nan", "inf"):
            assert f"got {value}" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["eval", "--batch-size", "0"], "--batch-size must be in [1, 1048576]"),
        (["eval", "--batch-size", HUGE_INT], "--batch-size must be in [1, 1048576]"),
        (["eval", "--batch-size", "nan"], INT),
        (["eval", "--num-heads", "0"], "--num-heads must be >= 1"),
        (["eval", "--num-heads", "-1"], "--num-heads must be >= 1"),
        (["eval", "--seed", "-1"], "--seed must be in [0, 4294967295]"),
        (["eval", "--seed", HUGE_INT], "--seed must be in [0, 4294967295]"),
        (["eval", "--seed", "inf"], INT),
        (["predict", "x.png", "--topk", "0"], "--topk must be >= 1"),
        (["predict", "x.png", "--topk", "-1"], "--topk must be >= 1"),
        (["predict", "x.png", "--topk", "nan"], INT),
        (["predict", "x.png", "--num-heads", "0"], "--num-heads must be >= 1"),
        (["explain", "x.png", "--num-heads", "-1"], "--num-heads must be >= 1"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1"),
        (["demo", "--batch-size", "-1"], "--batch-size must be >= 1"),
        (["demo", "--lr", "0"], "--lr must be > 0"),
        (["demo", "--lr", "nan"], "--lr must be > 0, got nan"),
        (["demo", "--lr=-inf"], "--lr must be > 0, got -inf"),
        (["demo", "--seed", "-1"], "--seed must be in [0, 4294967295]"),
        (["demo", "--bench-seconds", "0"], "--bench-seconds must be in (0, 600]"),
        (["demo", "--bench-seconds", "inf"], "--bench-seconds must be in (0, 600]"),
        (["demo", "--bench-seconds", "1e30"], "--bench-seconds must be in (0, 600]"),
        (["transfer", "--epochs", "0"], "--epochs must be >= 1"),
        (["transfer", "--pretrain-epochs", "-1"], "--pretrain-epochs must be >= 1"),
        (["transfer", "--seed", HUGE_INT], "--seed must be in [0, 4294967295]"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_other_commands_numeric_options(capsys, trained, argv, fragment):
    if argv[0] in ("eval", "predict", "explain"):
        argv = [*argv, "--init", trained]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_documented_meanings_of_valid_extremes(capsys, trained, digit_png):
    # --topk larger than the class count shows every class; --seed 0 is the run's own split.
    code, out, _ = run_cli(capsys, "predict", digit_png, "--init", trained, "--topk", HUGE_INT)
    assert code == 0 and out.count("%") == 3
    code, out, _ = run_cli(capsys, "eval", "--init", trained, "--seed", "0")
    assert code == 0 and "split seed 0" in out


def test_absurd_learning_rate_diverges_with_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *SMALL, "--epochs", "2", "--lr", "1e30", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "training diverged in epoch 1: the weights hold NaN/Inf")
    assert not os.path.exists(tmp_path / "out" / "checkpoint")  # the NaN weights were never saved


# ------------------------------------------------------------------------------------------------
# Parsers: help with defaults, no abbreviations, timm's spellings, one-line errors


def _parsers():
    from fastvit import demo, evaluate, explain, transfer
    from fastvit.__main__ import make_info_parser

    return {
        "train": train.make_parser(),
        "eval": evaluate.make_eval_parser(),
        "predict": evaluate.make_predict_parser(),
        "explain": explain.make_parser(),
        "demo": demo.make_parser(),
        "transfer": transfer.make_parser(),
        "info": make_info_parser(),
    }


@pytest.mark.parametrize("command", list(_parsers()))
def test_help_explains_every_option_and_shows_defaults(capsys, command):
    parser = _parsers()[command]
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
    assert not parser.allow_abbrev
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines anywhere
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default})" in text, (command, action.option_strings)
    if command == "train":  # the defaults issue 21 found invisible
        for flag, default in (("--clip-grad", 1.0), ("--label-smoothing", 0.1), ("--warmup-epochs", 3.0)):
            assert f"{flag}" in text and f"(default: {default})" in text
        for shown in ("(default: 30)", "(default: 0.002)", "(default: runs/train)"):
            assert shown in text


def test_abbreviated_options_are_refused(capsys):
    code, _, err = run_cli(capsys, "train", "--epoch", "3")
    assert_one_line_error(code, err, "unrecognized arguments: --epoch 3")
    assert "usage:" not in err and "see python -m fastvit train --help" in err


def test_timm_spellings_are_aliases():
    parser = train.make_parser()
    timm_style = parser.parse_args(
        ["--data-dir", "d", "--initial-checkpoint", "c", "-b", "8", "-j", "2", "--grad-accum-steps", "2"]
        + ["--smoothing", "0.2", "--model-ema", "--model-ema-decay", "0.99"]
    )
    ours = parser.parse_args(
        ["--data", "d", "--init", "c", "--batch-size", "8", "--workers", "2", "--grad-accum", "2"]
        + ["--label-smoothing", "0.2", "--ema", "0.99"]
    )
    assert vars(timm_style) == vars(ours)
    assert parser.parse_args(["--model-ema"]).ema == train.MODEL_EMA_DECAY


def test_bad_arguments_are_one_line_with_exit_code_2_from_a_shell(tmp_path):
    result = subprocess_cli("train", "--img-size", "-16")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "--img-size must be in [1, 8192], got -16" in result.stderr
    result = subprocess_cli("serve")
    assert result.returncode == 2 and "invalid choice: 'serve'" in result.stderr and "usage:" not in result.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
        (["train", "--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
        (["train", "--mixup", "0.2", "-b", "15"], "need an even --batch-size"),
        (["train", "--model", "vit_gigantic"], "--model 'vit_gigantic' is not a preset"),
        (
            ["train", "--model", "eva02_base_patch14_448", "--img-size", "32"],
            "--img-size 32 is not divisible by the patch size 14 of eva02_base_patch14_448",
        ),
        (["train", "--init", "/no/such/file.pth"], "--init '/no/such/file.pth' does not exist"),
        (["train", "--resume", "/no/such/run"], "--resume '/no/such/run' does not exist"),
        (["train", "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["eval", "--init", "/no/such/run"], "--init '/no/such/run' does not exist"),
        (["eval", "--init", "/no/such/run", "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_everyday_mistakes(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_device_cuda_without_a_gpu(capsys, trained, command):
    extra = ["--init", trained] if command == "eval" else []
    code, _, err = run_cli(capsys, command, "--device", "cuda", *extra)
    assert_one_line_error(code, err, "no CUDA device is available")


def test_output_naming_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "train", "--output", tmp_path / "file")
    assert_one_line_error(code, err, "is a file, not a folder")


def test_warmup_not_shorter_than_the_run_warns(tmp_path, capsys):
    parser = train.make_parser()
    train.prepare_args(parser.parse_args(["--epochs", "2", "--output", str(tmp_path)]), set(), parser)
    assert "--warmup-epochs 3 >= --epochs 2: the learning rate never reaches --lr" in capsys.readouterr().err


def test_info_names_where_the_default_backend_comes_from(capsys, monkeypatch):
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    monkeypatch.setattr(fastvit.dispatch, "_default_backend", None)
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and "default backend: auto (built-in; set FASTVIT_BACKEND to change)" in out
    monkeypatch.setenv("FASTVIT_BACKEND", "torch")
    monkeypatch.setattr(fastvit.dispatch, "_default_backend", None)
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and "default backend: torch (from FASTVIT_BACKEND)" in out


# ------------------------------------------------------------------------------------------------
# Resume resumes: the run's options and folder, an extended schedule, refused changes


def _history(output) -> list[dict]:
    with open(os.path.join(output, "metrics.json")) as f:
        return json.load(f)


def test_resume_restores_the_run_and_extends_its_schedule(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "R"
    code, _, _ = run_cli(capsys, "train", *SMALL, "--epochs", "3", "--output", run_dir, "--stop-after", "2")
    assert code == 0 and [h["epoch"] for h in _history(run_dir)] == [1, 2]
    monkeypatch.chdir(tmp_path)  # the default --output (runs/train) would be here: nothing may land in it
    code, out, err = run_cli(capsys, "train", "--resume", run_dir)
    assert code == 0, err
    assert "on digits[0-2]" in out and "global batch 32" in out  # the run's own options, not the defaults
    history = _history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2, 3] and not os.path.exists(tmp_path / "runs")
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the 3-epoch cosine ended

    code, out, err = run_cli(capsys, "train", "--resume", run_dir, "--epochs", "5")
    assert code == 0
    assert "--resume: --epochs 5 replaces the resumed run's 3" in err
    history = _history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    # The schedule is the 5-epoch one: epochs 4-5 train at a positive learning rate (not at the old end, 0),
    # and the weights move.
    state = ckpt.load_checkpoint(str(run_dir))["state"]
    assert state["args"]["epochs"] == 5 and state["num_updates"] == 5 * 14
    assert history[3]["lr"] > 1e-4 and history[3]["train_loss"] != history[2]["train_loss"]


def test_resume_refuses_changes_that_break_the_run(tmp_path, capsys, trained):
    for argv, fragment in (
        (["--opt", "sgd"], "--resume: --opt sgd differs from the resumed run's adamw"),
        (["--img-size", "16"], "--resume: --img-size 16 differs from the resumed run's 32"),
        (["--classes", "0-4"], "--resume: --classes 0-4 differs from the resumed run's 0-2"),
        (["--seed", "3"], "--resume: --seed 3 differs from the resumed run's 0"),
        (["-b", "16"], "--resume: --batch-size 16 differs from the resumed run's 32"),
        (["--overwrite"], "--overwrite would delete the run that --resume continues"),
    ):
        code, _, err = run_cli(capsys, "train", "--resume", trained, *argv)
        assert_one_line_error(code, err, fragment)


def test_resume_with_a_changed_weight_decay_applies_it(tmp_path, capsys):
    run_dir = tmp_path / "R"
    assert run_cli(capsys, "train", *SMALL, "--epochs", "2", "--stop-after", "1", "--output", run_dir)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", run_dir, "--weight-decay", "0.2", "--max-steps", "15")
    assert code == 0 and "--weight-decay 0.2 replaces the resumed run's 0.05" in err
    optimizer = ckpt.load_checkpoint(str(run_dir))["state"]["optimizer"]
    assert {g["weight_decay"] for g in optimizer["param_groups"]} == {0.0, 0.2}


# ------------------------------------------------------------------------------------------------
# Output folders: one run each, crash leftovers, args.yaml and model_best


def test_output_holding_another_run_needs_resume_or_overwrite(tmp_path, capsys, trained):
    code, _, err = run_cli(capsys, "train", *SMALL, "--output", trained)
    assert_one_line_error(code, err, "already holds a training run: --resume")
    code, _, err = run_cli(capsys, "train", *SMALL, "--init", trained, "--output", trained, "--overwrite")
    assert_one_line_error(code, err, "--overwrite would delete the --init weights")
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(trained, other)
    code, _, err = run_cli(
        capsys, "train", *SMALL, "--epochs", "2", "--max-steps", "1", "--output", other, "--overwrite"
    )
    assert code == 0, err
    assert [h["epoch"] for h in _history(other)] == [1]


def test_output_folder_is_locked_while_a_run_writes_to_it(tmp_path):
    output = tmp_path / "locked"
    output.mkdir()
    with ckpt.OutputLock(str(output)):
        result = subprocess_cli("train", *SMALL, "--epochs", "1", "--output", output)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "is in use by another training run (pid" in result.stderr
    with ckpt.OutputLock(str(output)):  # released: taken again at once
        pass


def test_crash_leftover_old_checkpoint_is_found_by_every_loader(tmp_path, capsys, trained):
    import shutil

    run_dir = tmp_path / "crashed"
    shutil.copytree(trained, run_dir)
    os.replace(run_dir / "checkpoint", run_dir / "checkpoint.old")  # killed between the two renames
    reference = fastvit.load_run(trained)
    for path in (run_dir, run_dir / "checkpoint", run_dir / "checkpoint" / "model.safetensors"):
        model = fastvit.load_run(path)
        assert torch.equal(model.head.weight, reference.head.weight), path
        fastvit.load_weights(fastvit.create_model("vit_digits_patch4_32", num_classes=3), path)
    code, out, err = run_cli(capsys, "eval", "--init", run_dir / "checkpoint")
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", "--resume", run_dir / "checkpoint", "--epochs", "3")
    assert code == 0, err
    assert "resumed from" in out and "checkpoint.old" in out
    assert os.path.isdir(run_dir / "checkpoint") and not os.path.exists(run_dir / "checkpoint.old")
    assert [h["epoch"] for h in _history(run_dir)] == [1, 2, 3]


def test_args_yaml_and_model_best(trained):
    import yaml

    with open(os.path.join(trained, "args.yaml")) as f:
        args = yaml.safe_load(f)
    assert args["epochs"] == 2 and args["classes"] == "0-2" and args["model"] == "vit_digits_patch4_32"
    history = _history(trained)
    best = max(history, key=lambda h: h["test_top1"])
    weights, metadata = ckpt.read_weights(os.path.join(trained, "model_best.safetensors"))
    assert metadata["best"] == {"epoch": best["epoch"], "metric": "test_top1", "value": best["test_top1"]}
    model = fastvit.load_run(os.path.join(trained, "model_best.safetensors"))
    assert model.pretrained_cfg["label_names"] == ["0", "1", "2"]
    if best["epoch"] == history[-1]["epoch"]:
        assert torch.equal(weights["head.weight"], fastvit.load_run(trained).head.weight)


# ------------------------------------------------------------------------------------------------
# eval / predict / explain


def test_eval_uses_the_split_the_model_was_trained_on(capsys, trained):
    code, out, _ = run_cli(capsys, "eval", "--init", trained)
    assert code == 0
    final = _history(trained)[-1]["test_top1"]
    assert f"top-1 {100 * final:.2f}%" in out and "digits[0-2]" in out and "split seed 0" in out
    assert "top-5" not in out  # 3 classes: top-5 says nothing
    code, _, err = run_cli(capsys, "eval", "--init", trained, "--seed", "3")
    assert_one_line_error(code, err, "the model was trained on digits classes 0-2 with split seed 0")


def test_predict_names_classes_warns_on_channel_conversion(tmp_path, capsys, trained, digit_png):
    from PIL import Image

    code, out, err = run_cli(capsys, "predict", digit_png, "--init", trained, "--topk", "2")
    assert code == 0 and out.startswith(f"{digit_png}: ") and out.count("%") == 2 and not err
    rgb = tmp_path / "rgb.png"
    Image.open(digit_png).convert("RGB").save(rgb)
    code, out_rgb, err = run_cli(capsys, "predict", str(rgb), "--init", trained, "--topk", "2")
    assert code == 0 and "warning: " in err and "converted to 1 grey channel" in err and str(rgb) in err
    assert out_rgb.split(": ", 1)[1] == out.split(": ", 1)[1]  # the same pixels give the same answer
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    code, _, err = run_cli(capsys, "predict", str(broken), "--init", trained)
    assert_one_line_error(code, err, f"cannot read image {broken}")


def test_predict_and_eval_preprocess_an_image_the_same_way(tmp_path, trained):
    from PIL import Image

    from fastvit.data import build_data
    from fastvit.evaluate import load_images

    model = fastvit.load_run(trained)
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        folder = tmp_path / "images" / split / "a"
        folder.mkdir(parents=True)
        Image.fromarray(torch.randint(0, 256, (40, 56), generator=generator, dtype=torch.uint8).numpy()).save(
            folder / "x.png"
        )
    data = build_data(str(tmp_path / "images"), 32, data_config=model.pretrained_cfg)
    from_eval = data.test[0][0]
    from_predict = load_images([str(tmp_path / "images" / "val" / "a" / "x.png")], model, "predict")[0]
    assert torch.equal(from_eval, from_predict)


def test_explain_writes_a_png_with_a_colour_bar(tmp_path, capsys, trained, digit_png):
    code, out, err = run_cli(capsys, "explain", digit_png, "--init", trained, "--output", tmp_path / "r.png")
    assert code == 0, err
    assert "attention rollout written to" in out and (tmp_path / "r.png").stat().st_size > 5_000


def test_non_checkpoint_pickle_never_suggests_weights_only_false(tmp_path, capsys, trained, digit_png):
    import argparse

    path = tmp_path / "run.pth"
    torch.save({"args": argparse.Namespace(lr=1), "model": {}}, path)
    for argv in (
        ["train", "--init", path, "--output", tmp_path / "o"],
        ["eval", "--init", path],
        ["predict", digit_png, "--init", path],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "not a weights-only checkpoint")
        assert "argparse.Namespace" in err and "weights_only=False" not in err


def test_fine_tune_builds_the_checkpoint_architecture(tmp_path, capsys):
    # The README's fine-tune command without --model: the architecture comes from the weights file.
    timm = pytest.importorskip("timm")
    source = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=1000
    )
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    fine_tune = ["--init", path, "--img-size", "48", "--layer-decay", "0.75", *SMALL, "--epochs", "2"]
    code, out, err = run_cli(capsys, "train", *fine_tune, "--max-steps", "2", "--output", tmp_path / "ft")
    assert code == 0, err
    assert "new head for 3 classes" in out and "3 to 1 input channels" in out and "(6, 6) grid" in out
    model = fastvit.load_run(tmp_path / "ft")
    assert model.embed_dim == 192 and len(model.blocks) == 2 and model.patch_embed.img_size == (48, 48)
    # With a --model that does not fit: one short line, not hundreds of key names.
    code, _, err = run_cli(
        capsys, "train", "--init", path, "--model", "vit_digits_patch4_32", *SMALL, "--output", tmp_path / "x"
    )
    assert_one_line_error(code, err, "leave out --model to build the checkpoint's own architecture")
    assert len(err) < 1500 and "more in .missing" in err


# ------------------------------------------------------------------------------------------------
# The CLI under exactly the extras the README tells users to install


def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _extras_blocker(extra: str | None) -> str:
    """Python code that makes the packages of every optional extra except ``extra`` unimportable."""
    project = _project()
    import_names = {"scikit-learn": "sklearn", "pytest-benchmark": "pytest_benchmark"}

    def modules(requirements):
        names = set()
        for requirement in requirements:
            name = requirement.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
            if not name.startswith("fastvit"):
                names.add(import_names.get(name, name.replace("-", "_")))
        return names

    extras = project["optional-dependencies"]
    allowed = modules(project["dependencies"]) | (modules(extras[extra]) if extra else set())
    if extra == "test":
        allowed |= modules(extras["demo"])
    blocked = set().union(*(modules(v) for v in extras.values())) - allowed
    # None in sys.modules is Python's own "not installed": import raises ModuleNotFoundError and
    # importlib.util.find_spec returns None, as for a package that is absent.
    return (
        "import sys, runpy\n"
        f"sys.modules.update(dict.fromkeys({sorted(blocked)!r}))\n"
        "sys.argv = ['fastvit', *sys.argv[1:]]\n"
        "runpy.run_module('fastvit', run_name='__main__', alter_sys=True)\n"
    )


def _cli_with_extras(extra, *argv, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", _extras_blocker(extra), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_with_the_core_install_only(tmp_path, digit_png):
    # `pip install fastvit`: no scikit-learn, no matplotlib. Training (on synthetic data) ends normally with the
    # plot skipped; what needs an extra says which one in one line.
    out = tmp_path / "synthetic"
    synthetic = ["--data", "synthetic", "--synthetic-size", "64", "-b", "16", "--epochs", "2", "--quiet"]
    result = _cli_with_extras(None, "train", *synthetic, "--max-steps", "2", "--output", out)
    assert result.returncode == 0, result.stderr
    assert "curves.png skipped: matplotlib is not installed (pip install 'fastvit[demo]')" in result.stdout
    assert (out / "metrics.json").exists() and not (out / "curves.png").exists()
    result = _cli_with_extras(None, "eval", "--init", out)
    assert result.returncode == 0, result.stderr
    result = _cli_with_extras(None, "train", "--output", tmp_path / "digits")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "needs scikit-learn: pip install 'fastvit[demo]'" in result.stderr
    result = _cli_with_extras(None, "explain", digit_png, "--init", out, "--output", tmp_path / "r.png")
    assert result.returncode == 2 and "needs matplotlib: pip install 'fastvit[demo]'" in result.stderr


def test_cli_with_the_demo_extra(tmp_path):
    # `pip install 'fastvit[demo]'` (the README's install for the demo and the train defaults): the default
    # training on the digits runs and writes its plot.
    result = _cli_with_extras("demo", "train", *SMALL, "--epochs", "1", "--max-steps", "2", "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curves.png").exists() and "skipped" not in result.stdout


def test_install_hints_name_extras_that_provide_the_package():
    import re

    extras = _project()["optional-dependencies"]
    sources = [os.path.join(REPO, "fastvit", name) for name in os.listdir(os.path.join(REPO, "fastvit"))]
    hints = []
    for source in (s for s in sources if s.endswith(".py")):
        with open(source) as f:
            text = f.read()
        hints += re.findall(r"needs ([\w-]+): pip install 'fastvit\[(\w+)\]'", text)
        skipped = re.findall(r"matplotlib is not installed \(pip install 'fastvit\[(\w+)\]'", text)
        hints += [("matplotlib", extra) for extra in skipped]
    assert hints
    for package, extra in hints:
        assert extra in extras and any(r.startswith(package) for r in extras[extra]), (package, extra)


def test_undecodable_image_in_an_image_folder_is_named(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "ok.png")
    broken = tmp_path / "images" / "val" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    argv = [
        "--data",
        tmp_path / "images",
        "--img-size",
        "16",
        "-b",
        "2",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--quiet",
    ]
    code, _, err = run_cli(capsys, "train", *argv, "--output", tmp_path / "out")
    assert_one_line_error(code, err, f"cannot read image {broken}")


def _captured_figure(monkeypatch):
    """The figure a plotting function closes at its end (matplotlib's close, intercepted)."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    return figures


def test_curves_have_a_learning_rate_panel(tmp_path, monkeypatch):
    figures = _captured_figure(monkeypatch)
    history = [dict(epoch=e, train_loss=1.0 / e, test_loss=1.1 / e, test_top1=0.5, lr=1e-3 * e) for e in (1, 2)]
    train.plot_history(history, str(tmp_path / "curves.png"))
    (figure,) = figures
    titles = [axis.get_title() for axis in figure.axes]
    assert "learning rate (end of epoch)" in titles
    (lr_axis,) = [a for a in figure.axes if a.get_title().startswith("learning rate")]
    assert list(lr_axis.lines[0].get_ydata()) == [1e-3, 2e-3]


def test_explain_heat_map_has_a_colour_bar(tmp_path, monkeypatch):
    from fastvit.explain import _plot

    figures = _captured_figure(monkeypatch)
    _plot(torch.rand(1, 32, 32), torch.full((8, 8), 1 / 64), "title", str(tmp_path / "r.png"))
    (figure,) = figures
    assert any(axis.get_ylabel() == "rollout weight (patch weights sum to 1)" for axis in figure.axes)


def test_every_command_has_an_entry_point():
    import importlib

    from fastvit.__main__ import COMMANDS, ENTRY_POINTS

    assert set(ENTRY_POINTS) | {"info"} == set(COMMANDS)
    for module, function in ENTRY_POINTS.values():
        assert callable(getattr(importlib.import_module(module), function))
