"""The runtime every recipe runs on: the loop (:mod:`.loop`), one training step's machinery (:mod:`.step`:
precision, the guarded optimiser step, NFE counting, trackers), checkpoints and the run folder, several
processes and sharding, non-finite guards, EMAs."""
