"""The shapes world's own base model: a tiny SD3 pipeline built from config (:mod:`.tiny_sd3`), its word-level
tokenizer over the world's vocabulary (:mod:`.tokenizer`), and its resumable pretraining on renders of the
world's captions (:mod:`.pretrain`, :mod:`.pretrain_state`; ``dgpo pretrain``)."""
