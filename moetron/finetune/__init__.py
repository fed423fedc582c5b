"""Fine-tuning: LoRA on attention, routers and experts (lora.py), in PEFT's format (peft_format.py)."""
