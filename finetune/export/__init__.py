"""Exporters: LoRA weights into files that diffusers (and the UIs) load, with what they were made from."""
