"""The timed generation path of the speed benchmarks makes exactly the images the generation helpers make,
so its per-piece timings (text encoding, sampling loop, decode) time the real thing."""

import numpy as np

from dgpo.cli import load_model
from dgpo.evaluation.evaluate import SamplerConfig, generate
from dgpo.sampling.ode import sample_ode
from dgpo.sampling.speed import median_breakdown, timed_generation
from dgpo.worlds import shapes
from tdm_r1.student import default_boundaries, generate_student, sample_student


def test_timed_generation_equals_the_helpers_and_its_pieces_add_up(tiny_base):
    model = load_model(tiny_base)
    prompts = shapes.prompts("test")[:3] * 2  # repeated prompts: encoded once, as in the helpers
    teacher, t = timed_generation(model, prompts, 7, lambda e, x: sample_ode(model, e, x, 3, 1.5, "euler"))
    expected, _ = generate(model, prompts, 1, SamplerConfig(3, 1.5, "euler"), seed=7, progress=False)
    np.testing.assert_array_equal(teacher, expected)

    bounds = default_boundaries(model, 2)
    student, s = timed_generation(model, prompts, 7, lambda e, x: sample_student(model, e, x, bounds))
    expected, _ = generate_student(model, prompts, bounds, 1, seed=7, progress=False)
    np.testing.assert_array_equal(student, expected)

    for r in (t, s):
        assert all(r[k] > 0 for k in ("text_s", "loop_s", "decode_s"))
        assert r["text_s"] + r["loop_s"] + r["decode_s"] <= r["total_s"]
    med = median_breakdown([{"loop_s": 1.0, "total_s": 4.0}, {"loop_s": 3.0, "total_s": 2.0},
                            {"loop_s": 2.0, "total_s": 9.0}])
    assert med == {"loop_s": 2.0, "total_s": 4.0}
