"""The pieces of a training job: losses, optimizer and schedule, accelerator set-up, checkpoints."""
