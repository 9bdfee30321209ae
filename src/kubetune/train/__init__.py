"""The Training phase: DeepSpeed fine-tuning on GPUs or, with the same code, on CPU (gloo, fp32)."""
