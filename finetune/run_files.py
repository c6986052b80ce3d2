"""Names of what a run writes under output_dir, shared by the code that writes them (training) and the code that
publishes them (export): one home below both, so export never imports training for a file name."""

SAMPLES = "samples"                # validation grids: samples/step-N.png
BEFORE_AFTER = "before_after.png"  # the base-vs-LoRA grid drawn at the end of a run, in SAMPLES
NO_EMA_WEIGHT_NAME = "pytorch_lora_weights_no_ema.safetensors"  # with train.ema_decay: the trained weights, beside
#                                                                 # the EMA's pytorch_lora_weights.safetensors
