"""GPU benchmarks: finetune against the peer on the same machine, model and images, in one run."""
