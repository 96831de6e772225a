"""Unlearning eval: clamp forget-specific SAE latents, measure WMDP-bio against MMLU accuracy."""
