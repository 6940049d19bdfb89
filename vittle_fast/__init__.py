"""vittle_fast: fused Visual Instruction Bottleneck Tuning (Vittle) kernels, model and FSDP trainer."""

__version__ = "0.1.0"
