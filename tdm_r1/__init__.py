"""tdm_r1: few-step students — TDM distillation and TDM-R1 reinforcement (built on :mod:`dgpo`).

- :mod:`tdm_r1.student` — the K-NFE student sampler (K Euler steps at fixed noise levels, no CFG) and its
  export as a stock diffusers call (``sampler.json`` / ``USAGE.md`` next to the LoRA);
- :mod:`tdm_r1.objectives` — TDM's formulas as pure functions (forward kernel, τ sampling, generator
  target, importance-weighted fake-score loss);
- :mod:`tdm_r1.distill` — the distillation loop and its run folder; :mod:`tdm_r1.config` — its typed config;
- :mod:`tdm_r1.cli` — the ``tdm-r1`` command (``distill``, ``sample``).

Layering: tdm_r1 imports dgpo; dgpo never imports tdm_r1. TDM-R1 (reward-guided students) is on the roadmap.
"""
