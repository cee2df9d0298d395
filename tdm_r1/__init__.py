"""tdm_r1: few-step students — TDM distillation and TDM-R1 reinforcement (built on :mod:`dgpo`).

- :mod:`tdm_r1.distill` — the TDM recipe (class ``Distiller``): one iteration read top to bottom, on the
  runtime of :mod:`dgpo.runtime`;
- :mod:`tdm_r1.reinforce` — the TDM-R1 recipe (class ``Reinforcer``): TDM plus the surrogate reward and the
  reward term; ``recipe_of(cfg)`` picks the recipe of a config;
- :mod:`tdm_r1.objectives` — every formula of both as pure functions (forward kernel, τ sampling, the
  generator's directions and regression loss, the importance-weighted fake-score loss);
- :mod:`tdm_r1.surrogate` — the stepwise surrogate reward; :mod:`tdm_r1.surrogate_training` — training it alone;
- :mod:`tdm_r1.student` — the K-NFE student sampler (K Euler steps at fixed noise levels, no CFG) and its
  export as a stock diffusers call (``sampler.json`` / ``USAGE.md`` next to the LoRA);
- :mod:`tdm_r1.published` — a published student converted to a LoRA folder; :mod:`tdm_r1.config` — the typed
  config; :mod:`tdm_r1.cli` — the ``tdm-r1`` command.

Layering: tdm_r1 imports dgpo; dgpo never imports tdm_r1.
"""
