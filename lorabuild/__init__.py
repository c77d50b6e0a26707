"""lorabuild: one declarative training spec to a trained LoRA, through safety gates."""

__version__ = "0.1.0"
