"""Dense softmax and its variants: every (allowed) query-key pair is computed."""
