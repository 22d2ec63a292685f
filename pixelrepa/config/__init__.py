"""Typed configuration in three parts, each importing only the one before it:

- `overrides`: nested dicts and JSON / YAML / TOML files into config dataclasses, dotted
  overrides with their values coerced to each field's type, and the fields that moved;
- `components`: one small dataclass per component, composed into `RunConfig`;
- `presets`: the named encoders and runs.
"""

from pixelrepa.config.components import (
    REFERENCE_PATH,
    AlignConfig,
    AlignMode,
    AttentionImpl,
    CompileMode,
    DataConfig,
    EMAConfig,
    EncoderConfig,
    EvalConfig,
    JiTConfig,
    KernelConfig,
    LinearKernel,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    SamplerConfig,
    SamplerMethod,
    SamplerSchedule,
    TargetDtype,
    TrainConfig,
    default_num_workers,
)
from pixelrepa.config.overrides import apply_overrides, config_from_file, flatten, read_config_file
from pixelrepa.config.presets import (
    ENCODER_PRESETS,
    MTA_PRESETS,
    backbone_name,
    get_encoder_preset,
    get_preset,
    list_presets,
    matching_preset,
    preset_note,
)

__all__ = [
    "ENCODER_PRESETS", "MTA_PRESETS", "REFERENCE_PATH", "AlignConfig", "AlignMode", "AttentionImpl", "CompileMode",
    "DataConfig", "EMAConfig", "EncoderConfig", "EvalConfig", "JiTConfig", "KernelConfig", "LinearKernel", "ObjectiveConfig",
    "OptimConfig", "RunConfig", "SamplerConfig", "SamplerMethod", "SamplerSchedule", "TargetDtype", "TrainConfig", "apply_overrides",
    "backbone_name", "config_from_file", "default_num_workers", "flatten", "get_encoder_preset", "get_preset", "list_presets",
    "matching_preset", "preset_note", "read_config_file",
]
