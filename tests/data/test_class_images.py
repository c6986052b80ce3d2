"""Class images: a generation stopped part-way (any subset written) is completed to the same set of files."""
from finetune.config import ModelConfig, PriorConfig
from finetune.data.class_images import generate_class_images, missing_class_indices
from finetune.models import load_pipeline


def test_interrupted_generation_completes_to_the_same_set(tiny_sd1, tmp_path):
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_sd1)))
    prior = PriorConfig(num_class_images=4, generation_steps=2, generation_batch_size=2)
    full, part = tmp_path / "full", tmp_path / "part"
    assert generate_class_images(pipe, full, "a photo of dog", prior, 64, 0, "cpu") == 4

    # Two processes, each stopped part-way: images 0 and 3 written, image 1 killed mid-write (its temp file stays).
    generate_class_images(pipe, part, "a photo of dog", prior, 64, 0, "cpu", indices=[0, 3])
    (part / ".class-00001-0123456789ab.png.tmp").write_bytes(b"half a png")
    assert missing_class_indices(part, 4) == [1, 2]
    assert generate_class_images(pipe, part, "a photo of dog", prior, 64, 0, "cpu") == 2
    assert {p.name: p.read_bytes() for p in part.glob("*.png")} == {p.name: p.read_bytes() for p in full.glob("*.png")}

    # A user's own images fill slots; generation only tops the folder up.
    (full / "mine.png").write_bytes((full / sorted(p.name for p in full.glob("*.png"))[0]).read_bytes())
    assert missing_class_indices(full, 6) == [4]
