"""tdm_r1: few-step students — TDM distillation and TDM-R1 reinforcement (built on :mod:`dgpo`).

Layering: tdm_r1 imports dgpo; dgpo never imports tdm_r1. The distillation and R1 trainers land with
their issues; this package holds them.
"""
