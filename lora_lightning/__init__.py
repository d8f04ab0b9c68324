"""lora-lightning: teach a Llama new facts with a fused LoRA and measure what it learned."""

__version__ = "0.1.0"
