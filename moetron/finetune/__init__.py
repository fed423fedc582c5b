"""Fine-tuning (`moetron finetune`): SFT and DPO (trainer.py) on JSONL data (data.py) packed into rows
(packing.py), with LoRA on attention, routers and experts (lora.py) in PEFT's format (peft_format.py)."""
