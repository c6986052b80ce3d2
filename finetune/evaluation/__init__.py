"""Did it work? The DreamBooth paper's metrics, per checkpoint: subject fidelity (DINO, CLIP-I), prompt fidelity
(CLIP-T) and prior drift.

Layers: `metrics`, `prompts`, `embedders`, `scoring` and `selection` sit beside `finetune.data` (they read only the
config and images), so training's validation can score its grids with them (`during_training`). `runner` reads
exported LoRA files and generates with finetune.inference: it sits above `finetune.export`, below the CLI.
"""
