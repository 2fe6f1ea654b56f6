"""The README's examples run as written.

Every ```python block runs in a fresh interpreter, and the ``python -m fastvit`` lines of a ```bash block run as
commands, in README order, in one fresh interpreter per block (each line through ``fastvit.__main__.main``, what
``python -m fastvit`` calls, so that a block pays for importing torch once), all in one scratch folder. A block
preceded by ``<!-- readme-test: skip (why) -->`` is not run (minutes of training, a GPU, a package install); the
reason is in the README next to it. The inputs the README names but cannot ship are made here as tiny stand-ins:
``digit.png`` (a digit from the test split), ``DIR`` (an ImageFolder of a few random images) and
``vit_b16_224.pth`` (a one-block timm ViT with 16-px patches: the fine-tuning command builds whatever architecture
the file holds), and ``runs/demo`` (what ``make demo`` writes, from a 1-epoch run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, skip reason) of every fenced python/bash block in the README."""
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[index])
        if fence and fence.group(1) in ("python", "bash"):
            start, body = index + 1, []
            index += 1
            while not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            previous = next((line for line in reversed(lines[: start - 1]) if line.strip()), "")
            skip = SKIP.search(previous)
            blocks.append((start, fence.group(1), "\n".join(body), skip.group(1) if skip else None))
        index += 1
    return blocks


def bash_commands(code: str) -> list[list[str]]:
    """The ``python -m fastvit`` commands of a bash block, continuation lines joined and comments removed."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] == ["python", "-m", "fastvit"]:
            commands.append(words[3:])
        elif words:
            raise AssertionError(f"a README bash line the test cannot run (mark the block skipped): {line!r}")
    return commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The scratch folder with the README's named inputs."""
    from PIL import Image

    from fastvit.data import build_data

    folder = tmp_path_factory.mktemp("readme")
    data = build_data("digits", 32, shift=0)
    pixels = (data.test[0][0][0] * data.std[0] + data.mean[0]).clamp(0, 1) * 255
    Image.fromarray(pixels.round().byte().numpy(), mode="L").save(folder / "digit.png")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in ("cats", "dogs"):
            (folder / "DIR" / split / name).mkdir(parents=True)
            for i in range(3):
                image = torch.randint(0, 256, (40, 52, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(image.numpy()).save(folder / "DIR" / split / name / f"{i}.png")
    timm = pytest.importorskip("timm")
    stand_in = timm.models.vision_transformer.VisionTransformer(patch_size=16, embed_dim=192, depth=1, num_heads=3)
    torch.save(stand_in.state_dict(), folder / "vit_b16_224.pth")
    demo = ["train", "--epochs", "1", "--output", "runs/demo", "--quiet"]
    result = _run_commands([demo], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


# Runs each argv list as `python -m fastvit ARGV` would (the same main, the same exit-code rule), stopping at the
# first command that exits non-zero, and names it.
RUNNER = """
import json, shlex, sys
from fastvit.__main__ import main
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    if code not in (0, None):
        sys.exit(f"exit code {code} from: python -m fastvit {shlex.join(argv)}")
"""


def _run_commands(commands: list[list[str]], cwd) -> subprocess.CompletedProcess:
    """The ``python -m fastvit`` argument lists ``commands`` in one fresh interpreter, in order."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(commands)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )


BLOCKS = readme_blocks()


def test_the_readme_has_runnable_examples():
    runnable = [b for b in BLOCKS if b[3] is None]
    assert {language for _, language, _, _ in runnable} == {"python", "bash"}
    assert sum(len(bash_commands(code)) for _, language, code, _ in runnable if language == "bash") >= 5


@pytest.mark.parametrize(
    "line, language, code, skip", BLOCKS, ids=[f"README.md:{line}-{language}" for line, language, *_ in BLOCKS]
)
def test_readme_block_runs(workdir, line, language, code, skip):
    if skip is not None:
        pytest.skip(f"README.md:{line} is marked: {skip}")
    if language == "python":
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600, env=_env()
        )
        assert result.returncode == 0, f"README.md:{line}\n{result.stderr[-3000:]}"
        return
    result = _run_commands(bash_commands(code), workdir)
    assert result.returncode == 0, f"README.md:{line}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
