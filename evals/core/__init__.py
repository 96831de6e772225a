"""The core eval: reconstruction quality, sparsity, and next-token loss and KL with the SAE spliced in."""
