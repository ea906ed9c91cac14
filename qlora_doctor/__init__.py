"""qlora-doctor: diagnose, pin and run QLoRA fine-tunes on one GPU."""

__version__ = "0.1.0"
