"""genrec online service: loads a bundle and serves recommendations (numpy + onnxruntime, no torch)."""
