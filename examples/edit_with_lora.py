"""Put the trained subject into your own picture, from Python: image-to-image and inpainting with the LoRA.

    python examples/edit_with_lora.py BASE_MODEL RUN_DIR PHOTO MASK "a photo of sks dog on the sofa" [OUT_DIR] [STEPS]

BASE_MODEL is what you trained on (SD 1.x, SD 2.x or SDXL); RUN_DIR holds pytorch_lora_weights.safetensors.
PHOTO's sides are multiples of 8; MASK is the same size, white where the subject goes. Writes OUT_DIR/drawn.png
(from noise), moved.png (the photo redrawn at strength 0.6) and placed.png (the subject painted into the mask).
"""
import sys
from pathlib import Path

from finetune import FinetuneError
from finetune.inference import Sampling, image_to_image, inpaint, load_generator, open_image, text_to_image

base, run_dir, photo_path, mask_path, prompt = sys.argv[1:6]
out = Path(sys.argv[6] if len(sys.argv) > 6 else "edited")
steps = int(sys.argv[7]) if len(sys.argv) > 7 else 25  # sampler steps (image-to-image takes strength x steps)
try:
    pipe = load_generator(base, [(run_dir, 1.0)])  # the base model with the LoRA; every mode below shares it
    photo, mask = open_image(photo_path), open_image(mask_path, "mask")
    sampling = Sampling(steps=steps, seed=0, negative_prompt="blurry, low quality")
    results = {"drawn": text_to_image(pipe, [prompt], sampling),
               "moved": image_to_image(pipe, [prompt], photo, strength=0.6, sampling=sampling),
               "placed": inpaint(pipe, [prompt], photo, mask, sampling=sampling)}
except FinetuneError as exc:
    sys.exit(f"error: {exc}")
out.mkdir(parents=True, exist_ok=True)
for name, images in results.items():
    images[0].save(out / f"{name}.png")
print(f"wrote {', '.join(f'{name}.png' for name in results)} to {out}")
