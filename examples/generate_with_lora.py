"""Load a finetune LoRA in plain diffusers and generate: no finetune import needed.

    python examples/generate_with_lora.py BASE_MODEL RUN_DIR "a photo of sks dog on a beach" [OUT.png]

BASE_MODEL is what you trained on (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5); RUN_DIR holds
pytorch_lora_weights.safetensors.
"""
import sys

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

base, run_dir, prompt = sys.argv[1:4]
out = sys.argv[4] if len(sys.argv) > 4 else "lora.png"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

pipe = StableDiffusionPipeline.from_pretrained(base, dtype=dtype, safety_checker=None)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
pipe.load_lora_weights(run_dir)  # rank and alpha come from the file's header
pipe.to(device)
image = pipe(prompt, num_inference_steps=25, guidance_scale=7.5,
             generator=torch.Generator(device).manual_seed(0)).images[0]
image.save(out)
print(f"saved {out}")
