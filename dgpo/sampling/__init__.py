"""Sampling: the ODE samplers (:mod:`.ode`), Flow-GRPO's SDE with log-probabilities (:mod:`.sde`), the one
generation loop (:mod:`.generation`), its timing (:mod:`.speed`) and sample folders (:mod:`.samples_io`)."""
