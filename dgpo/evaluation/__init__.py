"""Evaluation: images for a world's prompts, scored by the world (:mod:`.evaluate`), and the cache of the base's
evaluation that every run on the same base shares (:mod:`.cache`)."""
