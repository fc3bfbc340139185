"""llmtrain: distributed training of decoder language models (pretraining, SFT, LoRA) on
Ray Train + DeepSpeed ZeRO, fed by Arrow-packed token shards, with Triton kernels."""

__version__ = "0.1.0"
