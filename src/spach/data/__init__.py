"""Data: ImageFolder checks, a loader that survives bad images, DeiT transforms and the eval preset, samplers,
demo data."""
from .demo import prepare_demo_dataset
from .folder import TolerantImageFolder, check_dataset, load_rgb
from .samplers import EvalShardSampler, RASampler, ShuffleSampler
from .transforms import build_eval_transform, build_transform, patch_posterize, posterize_safe

__all__ = ["prepare_demo_dataset", "TolerantImageFolder", "check_dataset", "load_rgb", "RASampler",
           "ShuffleSampler", "EvalShardSampler", "build_transform", "build_eval_transform", "patch_posterize",
           "posterize_safe"]
