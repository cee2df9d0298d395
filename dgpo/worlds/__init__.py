"""Worlds: the tasks a model is trained and measured on, as plug-ins (:mod:`.registry`: ``register_world``,
``make_world``).

- :mod:`.shapes` — the embedded shapes world's grammar, renderer and verifier (docs/shapes.md);
  :mod:`.shapes_captions` and :mod:`.shapes_fidelity` — its pretraining captions; :mod:`.quality` — its FD;
  :mod:`.sharpness` — its sharpness beside the FD; :mod:`.shapes_world` — the world itself;
  :mod:`.shapes_base` — its embedded base model.
- :mod:`.prompt_file` — a world read from a JSON-lines prompt file (GenEval, OCR, PickScore prompt sets).
"""
