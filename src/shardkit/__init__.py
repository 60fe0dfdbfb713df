"""shardkit: reproduce and plan sharded LLaMA fine-tunes (FSDP, DeepSpeed ZeRO-3)."""

__version__ = "0.1.0"
