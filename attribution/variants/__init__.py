"""Validation sets made from training documents (copies, excerpts, paraphrases, rewrites, similar-topic
documents), with measured distances to the original, for the copyright experiment."""
