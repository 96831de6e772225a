"""The sparse probing eval: linear probes on the top k SAE latents, in SAEBench's result layout."""
