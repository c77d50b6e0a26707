"""`python -m lorabuild.trainer`: the builtin LoRA trainer (see docs/trainer.md)."""

from lorabuild.trainer.cli import run_module

if __name__ == "__main__":
    run_module()
