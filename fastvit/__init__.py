"""fastvit: fused Triton/CUDA kernels for Vision Transformers behind a timm-compatible model.

import fastvit
model = fastvit.create_model("vit_base_patch16_224", num_classes=10)
model = fastvit.load_run("runs/train")                    # what `python -m fastvit train` saved
transform = fastvit.data.create_transform(model)          # PIL image -> the model's input, from its data config
fastvit.backends()            # which fused backends can run here, and why not
fastvit.selftest()            # check the fused kernels on this GPU; 'auto' uses them where they passed
"""

from fastvit import data, ops, verification
from fastvit.convert import from_hf, from_timm, from_torchvision, load_run, load_weights
from fastvit.dispatch import (
    backends,
    deterministic_enabled,
    get_default_backend,
    set_default_backend,
    set_deterministic,
)
from fastvit.eva import Eva
from fastvit.model import (
    PRESETS,
    VisionTransformer,
    ViT,
    aimv2_large_patch14_224,
    create_model,
    list_models,
    vit_base_patch14_dinov2,
    vit_base_patch16_224,
    vit_base_patch16_siglip_224,
    vit_base_patch32_224,
    vit_base_patch32_clip_quickgelu_224,
    vit_digits_patch4_32,
    vit_giant_patch14_dinov2,
    vit_huge_patch14_224,
    vit_large_patch14_clip_336,
    vit_large_patch16_224,
    vit_small_patch16_224,
    vit_so400m_patch14_siglip_384,
    vit_so400m_patch16_siglip_256,
    vit_tiny_patch16_224,
)
from fastvit.naflex import NaFlexVit, NaFlexVitCfg
from fastvit.optimize import optimize
from fastvit.packing import PackedSequences
from fastvit.selftest_runner import selftest
from fastvit.session import InferenceSession
from fastvit.verification import UnverifiedKernelWarning

__version__ = "0.1.0"

__all__ = [
    "data",
    "ops",
    "verification",
    "selftest",
    "UnverifiedKernelWarning",
    "backends",
    "get_default_backend",
    "set_default_backend",
    "set_deterministic",
    "deterministic_enabled",
    "VisionTransformer",
    "ViT",
    "Eva",
    "NaFlexVit",
    "NaFlexVitCfg",
    "PRESETS",
    "create_model",
    "list_models",
    "from_timm",
    "from_torchvision",
    "from_hf",
    "load_weights",
    "load_run",
    "optimize",
    "InferenceSession",
    "PackedSequences",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "vit_digits_patch4_32",
    "vit_base_patch16_siglip_224",
    "vit_so400m_patch14_siglip_384",
    "vit_so400m_patch16_siglip_256",
    "vit_large_patch14_clip_336",
    "vit_base_patch32_clip_quickgelu_224",
    "vit_base_patch14_dinov2",
    "vit_giant_patch14_dinov2",
    "aimv2_large_patch14_224",
]
