"""Models: the model-handle protocol every algorithm works on and its families (:mod:`.handle`: SD3; :mod:`.flux`;
:mod:`.zimage`; :mod:`.families`: ``load_model``), named LoRA roles on one backbone (:mod:`.adapters`, :mod:`.lora`,
:mod:`.lora_io`), prompt encodings computed once (:mod:`.prompt_encodings`), tiny pipelines of the real families
built from config (:mod:`.tiny_pipelines`), and published weights read safely (:mod:`.weights_file`)."""
