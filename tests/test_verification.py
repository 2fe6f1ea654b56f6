"""The evidence gate of ``backend='auto'`` (``fastvit.verification``), with synthetic selftest records.

No GPU is needed: the fused backends are made to count as usable on CUDA tensors and the device facts are those
of a pretend H200 (compute capability 9.0), so only call signatures are asked about (no kernel runs). Records are
written to a temporary cache (``FASTVIT_CACHE``) and a temporary shipped manifest.
"""

from __future__ import annotations

import json
import pathlib
import threading
import warnings

import pytest
import torch

import fastvit
from fastvit import dispatch, verification
from fastvit.ops.attention import attention_call
from fastvit.ops.patch_embed import PatchEmbedCall

CUDA = torch.device("cuda")
H200 = verification.DeviceFacts("9.0", "NVIDIA H200")


@pytest.fixture
def gate(monkeypatch, tmp_path):
    """A pretend GPU, an empty cache and manifest under tmp_path, FASTVIT_VERIFY unset, fresh warnings."""
    real = dispatch.backend_unusable_reason
    monkeypatch.setattr(dispatch, "backend_unusable_reason", lambda b, d: None if d.type == "cuda" else real(b, d))
    real_facts = verification.device_facts
    monkeypatch.setattr(
        verification, "device_facts", lambda d: H200 if torch.device(d).type == "cuda" else real_facts(d)
    )
    monkeypatch.setenv("FASTVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verification, "MANIFEST_PATH", tmp_path / "manifest.json")
    monkeypatch.delenv("FASTVIT_VERIFY", raising=False)
    monkeypatch.setattr(verification, "_warned", set())
    monkeypatch.setattr(verification, "_corrupt_warned", set())
    verification.reload()
    yield tmp_path
    monkeypatch.undo()
    verification.reload()


def qkv_call(dtype=torch.bfloat16, device=CUDA):
    return attention_call(device, dtype, 64)


def record(op="qkv_attention", backend="triton", dtype=torch.bfloat16, passed=True, **fields):
    """A record of a selftest run now, here (pretend H200), optionally with some key fields replaced."""
    made = verification.new_record(op, backend, CUDA, dtype, passed, checks=10, configs=5, detail="" if passed else "x")
    return verification.Record(**{**made.__dict__, **fields})


def store(*records, where="cache"):
    path = verification.cache_path() if where == "cache" else verification.MANIFEST_PATH
    verification.write_records(path, records)


def chosen(op="qkv_attention", call=None, backend="auto"):
    """(backend that runs the call, why not fused) as the op's selection sees it (warnings collected)."""
    call = qkv_call() if call is None else call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = dispatch.select(op, backend, call)
    name = next(name for name, impl in dispatch._REGISTRY[op].items() if impl.fn is fn)
    return name, dispatch.explain(op, backend, call)[1], [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------
# The gate


def test_without_records_auto_runs_torch_on_a_gpu_and_warns_once_naming_the_command(gate):
    name, why, warned = chosen()
    assert name == "torch"
    assert "is not verified" in why and "python -m fastvit selftest" in why and "compute capability 9.0" in why
    assert len(warned) == 1 and "python -m fastvit selftest" in warned[0] and "FASTVIT_VERIFY=off" in warned[0]
    # once per process: other ops and dtypes fall back silently afterwards, the reports still say why
    assert chosen("ln_mlp", dispatch.DeviceDtypeCall(CUDA, torch.float16))[2] == []
    assert chosen(call=qkv_call(torch.float16))[2] == []


def test_a_passing_record_enables_the_kernel_for_its_dtype_only(gate):
    store(record(dtype=torch.bfloat16))
    assert chosen(call=qkv_call(torch.bfloat16))[:2] == ("triton", None)
    assert chosen(call=qkv_call(torch.float16))[0] == "torch"  # other dtype: no evidence
    assert chosen("attention", qkv_call(torch.bfloat16))[0] == "torch"  # same kernels, other op: its own record


def test_the_shipped_manifest_counts_as_evidence(gate):
    store(record(dtype=torch.float16), where="manifest")
    assert chosen(call=qkv_call(torch.float16))[:2] == ("triton", None)
    evidence = verification.lookup("qkv_attention", "triton", CUDA, torch.float16)
    assert evidence.state == "verified" and evidence.source == "manifest"


def test_a_failing_record_makes_auto_avoid_the_kernel_and_say_why(gate):
    store(record(passed=True), where="manifest")
    store(record(passed=False, detail="B=2 N=197 D=64: grad qkv: ours 1e-1, torch 1e-3, bound 2e-3"))  # the user's
    name, why, warned = chosen()
    assert name == "torch"
    assert "FAILED" in why and "grad qkv: ours 1e-1" in why and "auto avoids this kernel" in why
    assert len(warned) == 1 and "FAILED" in warned[0]


def test_a_stale_kernel_hash_is_not_evidence(gate):
    store(record(kernel_hash="0123456789abcdef"))
    name, why, _ = chosen()
    assert name == "torch" and "the kernel changed since" in why


def test_editing_a_kernel_source_changes_its_hash(gate, monkeypatch, tmp_path):
    before = verification.kernel_hash("qkv_attention", "triton")
    assert verification.kernel_hash("attention", "triton") != verification.kernel_hash("patch_embed", "triton")
    sources = verification.kernel_sources("qkv_attention", "triton")
    assert sources == (
        "fastvit.ops.triton.attention",
        "fastvit.ops.triton.attention_launch",
        "fastvit.ops.triton.attention_prologue",
        "fastvit.ops.triton.launch",
        "fastvit.kernels.attention",
    )
    assert "fastvit.ops.triton.patch_embed_configs" in verification.kernel_sources("patch_embed", "triton")
    assert "fastvit.ops.triton.linear_launch" in verification.kernel_sources("ln_linear", "triton")
    edited = tmp_path / "attention.py"
    real_find = verification.importlib.util.find_spec
    source = pathlib.Path(real_find("fastvit.kernels.attention").origin).read_text()
    edited.write_text(source + "\n# one more line\n")

    def find_spec(name):
        spec = real_find(name)
        if name == "fastvit.kernels.attention":
            spec = type(spec)(name, spec.loader, origin=str(edited))
        return spec

    monkeypatch.setattr(verification.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(verification, "_hashes", {})
    assert verification.kernel_hash("qkv_attention", "triton") != before


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("capability", "8.0", "no selftest record"),  # an A100's record says nothing about an H200
        ("dtype", "float16", "no selftest record"),
        ("torch", "1.0", "its records are for torch 1.0"),
        ("triton", "2.0", "triton 2.0"),
    ],
)
def test_records_of_another_gpu_dtype_or_version_are_not_evidence(gate, field, value, expected):
    store(record(**{field: value}))
    name, why, _ = chosen()
    assert name == "torch" and expected in why


def test_fastvit_verify_off_restores_fused_kernels_without_evidence(gate, monkeypatch):
    monkeypatch.setenv("FASTVIT_VERIFY", "off")
    verification.reload()
    assert chosen()[:2] == ("triton", None)
    monkeypatch.setenv("FASTVIT_VERIFY", "maybe")
    verification.reload()
    with pytest.raises(ValueError, match="FASTVIT_VERIFY must be 'on' or 'off', got 'maybe'"):
        chosen()


def test_an_explicit_backend_never_asks_for_evidence(gate):
    store(record(passed=False))
    assert chosen(backend="triton")[:2] == ("triton", None)
    assert chosen("ln_mlp", dispatch.DeviceDtypeCall(CUDA, torch.float32), backend="cuda")[:2] == ("cuda", None)


def test_cpu_tensors_need_no_evidence_and_never_warn(gate):
    name, why, warned = chosen(call=qkv_call(torch.float32, torch.device("cpu")))
    assert name == "torch" and "on cpu tensors" in why and warned == []
    assert verification.lookup("qkv_attention", "triton", "cpu", torch.float32).state == "not needed"


def test_patch_embed_evidence_is_keyed_on_its_gemm_dtype(gate):
    store(record("patch_embed", dtype=torch.bfloat16))
    plain = PatchEmbedCall(CUDA, (torch.bfloat16,), None, 3, False)
    autocast = PatchEmbedCall(CUDA, (torch.float32,), torch.bfloat16, 3, False)  # fp32 tensors, bf16 GEMM
    assert verification.compute_dtype(autocast) == torch.bfloat16
    assert chosen("patch_embed", plain)[0] == "triton" and chosen("patch_embed", autocast)[0] == "triton"
    assert chosen("patch_embed", PatchEmbedCall(CUDA, (torch.float32,), None, 3, False))[0] == "torch"


def test_quick_passes_are_not_evidence_and_never_replace_a_full_run(gate):
    store(record(quick=True))
    assert chosen()[0] == "torch" and "--quick" in chosen()[1]
    store(record(quick=False))
    store(record(quick=True))  # a later quick pass keeps the full run's record
    assert chosen()[:2] == ("triton", None)
    store(record(quick=True, passed=False))  # a quick failure is evidence
    assert chosen()[0] == "torch"


def test_the_gate_is_a_constant_for_torch_compile(gate):
    def decide(x):
        call = attention_call(torch.device("cuda"), torch.bfloat16, 64)
        why = verification.evidence_reason("qkv_attention", "triton", call, True)
        return x + (1.0 if why is None else 2.0)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", verification.UnverifiedKernelWarning)
        assert torch.compile(decide, fullgraph=True)(torch.zeros(2)).tolist() == [2.0, 2.0]
    store(record())
    torch._dynamo.reset()
    assert torch.compile(decide, fullgraph=True)(torch.zeros(2)).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# The record files


def test_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(gate):
    path = verification.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "records": [{"op": ')
    with pytest.warns(verification.UnverifiedKernelWarning, match="ignoring the verification records"):
        assert verification.lookup("qkv_attention", "triton", CUDA, torch.bfloat16).state == "unverified"
    store(record())
    assert json.loads(path.read_text())["records"][0]["op"] == "qkv_attention"
    assert chosen()[:2] == ("triton", None)


@pytest.mark.parametrize(
    "content",
    ['{"format": 99, "records": []}', '{"records": [{"op": "x"}]}', "[1, 2]", '{"format": 1, "records": [7]}'],
    ids=["other-format", "missing-fields", "not-an-object", "record-not-an-object"],
)
def test_malformed_record_files_count_as_empty(gate, content):
    path = verification.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(verification.UnverifiedKernelWarning):
        assert verification.read_records(path) == []


def test_concurrent_writers_lose_nothing_and_readers_never_see_a_partial_file(gate):
    path = verification.cache_path()
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    mine = [record(op, backend, dtype) for op, backend in dispatch.fused_implementations() for dtype in dtypes]
    errors, done = [], threading.Event()

    def writer(chunk):
        for item in chunk:
            try:
                verification.write_records(path, [item])
            except Exception as exc:  # noqa: BLE001  (collected, asserted below)
                errors.append(exc)

    def reader():
        while not done.is_set():
            if path.exists():
                try:
                    json.loads(path.read_text())
                except ValueError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=writer, args=(mine[i::4],)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert errors == []
    assert {r.key() for r in verification.read_records(path)} == {r.key() for r in mine}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_record_round_trips_through_json(gate):
    original = record(passed=False, worst_ratio=float("inf"))
    assert verification.Record.from_json(json.loads(json.dumps(original.to_json()))) == original
    with pytest.raises(ValueError, match="record field 'passed' must be true or false"):
        verification.Record.from_json({**original.to_json(), "passed": "yes"})


# ------------------------------------------------------------------------------------------------
# What the reports say


def test_backend_plan_and_fusion_report_show_the_verification_state(gate):
    model = fastvit.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=3)
    plan = model.backend_plan("cuda", torch.bfloat16)
    assert plan["qkv_attention"] == "torch" and "is not verified" in plan.evidence["qkv_attention"]
    on_cpu = model.backend_plan("cpu")
    assert on_cpu == dict.fromkeys(plan, "torch") and not any(on_cpu.evidence.values())
    store(*(record(op, backend, torch.bfloat16) for op, backend in dispatch.fused_implementations()))
    plan = model.backend_plan("cuda", torch.bfloat16)
    assert plan["qkv_attention"] == "triton" and plan["ln_mlp"] == "cuda"
    assert plan.evidence["qkv_attention"].startswith("triton: verified (cache: NVIDIA H200")
    assert "qkv_attention" in str(plan) and "verified" in str(plan)
    report = model.eval().fusion_report("cuda", torch.bfloat16)
    assert report.all_fused and "evidence: qkv_attention: triton: verified" in str(report)
    report = model.fusion_report("cuda", torch.float16)  # no records for float16
    assert not report.all_fused and "is not verified" in str(report)
    model.set_backend({"qkv_attention": "triton"})
    assert "explicit backend 'triton'" in model.backend_plan("cuda", torch.float16).evidence["qkv_attention"]


def test_backends_reports_the_verification_state_per_op(gate, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    store(record(dtype=torch.bfloat16), record(dtype=torch.float16, passed=False))
    report = fastvit.backends()
    state = report["triton"].verification["qkv_attention"]
    assert "verified (cache): bfloat16" in state and "failed (cache): float16" in state
    assert "unverified: float32" in state and "python -m fastvit selftest" in state
    assert "qkv_attention: verified (cache): bfloat16" in str(report["triton"])
    monkeypatch.setenv("FASTVIT_VERIFY", "off")
    verification.reload()
    assert fastvit.backends()["cuda"].verification["ln_mlp"] == "not checked (FASTVIT_VERIFY=off)"


def test_the_extension_hash_is_setup_pys_hash_of_csrc(tmp_path, monkeypatch):
    import runpy
    import shutil

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # read setup.py's functions without building
    monkeypatch.setenv("FASTVIT_NO_EXT", "1")  # and without configuring an extension (which sets CUDA variables)
    setup_py = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "setup.py"), run_name="not_main")
    shutil.copytree(pathlib.Path(__file__).parent.parent / "csrc", tmp_path / "csrc")
    before = setup_py["csrc_source_hash"](tmp_path)
    assert len(before) == 16 and before == setup_py["csrc_source_hash"](tmp_path)
    with open(tmp_path / "csrc" / "bindings.cpp", "a") as f:
        f.write("\n// an edit\n")
    assert setup_py["csrc_source_hash"](tmp_path) != before  # an edited kernel retires its evidence
    compiled = verification.extension_source_hash()
    if compiled in ("unbuilt", "unknown"):
        pytest.skip(f"the extension here is {compiled} (built without the hash): nothing to compare")
    assert len(compiled) == 16 and int(compiled, 16) >= 0
