"""TDM distillation on a tiny base: the fake score learns, the student moves towards the teacher, and
stock diffusers reproduces the exported student from the settings written next to it."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

from dgpo.models.handle import PromptEmbeds
from dgpo.sampling.ode import initial_noise, sample_ode
from tdm_r1.cli import main
from tdm_r1.config import load_distill_config
from tdm_r1.distill import Distiller, prepare_run_dir

from conftest import assert_margin

TINY_RUN = ["run.time_budget_min=0", "optim.batch_size=8", "eval.per_prompt=1", "eval.fd=false",
            "eval.every=1000", "student.lora_rank=4", "student.lora_alpha=4", "fake.lora_rank=4", "fake.lora_alpha=4",
            "run.checkpoint_every=1000"]


#: The recipe the outcome tests' margins were measured on (the default changed after: few-step-students.md).
MEASURED_RECIPE = "configs/tdm/shapes_scheduler_levels.yaml"


def tiny_cfg(tiny_base, out, *extra, recipe="configs/tdm/shapes.yaml"):
    return load_distill_config(recipe, [f"teacher.base={tiny_base}", f"run.out_dir={out}", *TINY_RUN, *extra])


def test_fake_score_update_lowers_its_loss_on_a_fixed_batch(tiny_base, tmp_path, outcome_seed):
    """30 fake-score updates on one batch lower the fake loss on it by at least 1.5% (and move nothing else;
    much of the loss is the irreducible denoising error, so it falls by 6-7%). Measured margin,
    (1 − after/before) / 0.015 over seeds 0-2 at 1 and 2 threads: 3.8-4.5× (falls of 5.8-6.7%)."""
    d = Distiller(tiny_cfg(tiny_base, tmp_path / "run", "optim.fake_lr=1e-2", f"run.seed={outcome_seed}",
                           recipe=MEASURED_RECIPE), log=lambda *a: None)
    rollout = d.rollout(d.sample_prompts(8))
    points = d.trajectory_points(rollout)
    with torch.no_grad():
        before, w = d.fake_loss(rollout, points)
    assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0, rel=1e-4)
    student_before = [p.detach().clone() for p in d.student_params]
    for _ in range(30):
        d.fake_update(rollout, points)
    with torch.no_grad():
        after, _ = d.fake_loss(rollout, points)
    assert_margin(1 - after.item() / before.item(), 0.015, "fake loss: relative fall", before=before.item(),
                  after=after.item())
    # Only the fake score moved.
    assert all(torch.equal(a, b) for a, b in zip(student_before, d.student_params))


def _distance_to_teacher(d, prompts, seeds):
    """Mean squared distance between the student's K-step latents and the teacher's 20-step CFG latents."""
    from tdm_r1.student import sample_student
    embeds = PromptEmbeds.cat([d.embeds_of[p] for p in prompts])
    noise = initial_noise(seeds, d.teacher.latent_shape)
    with d.as_teacher() as teacher:
        target = sample_ode(teacher, embeds, noise, 20, d.cfg.teacher.guidance_scale)
    with d.as_student() as student:
        ours = sample_student(student, embeds, noise, d.boundaries)
    return ((ours - target) ** 2).mean().item()


def test_distillation_moves_the_student_towards_the_teacher(tiny_base, tmp_path, outcome_seed):
    """A few TDM iterations bring the student's 4-step samples closer to the teacher's 20-step CFG samples
    on a fixed seed set. The tiny test base is barely trained, so its 4-step and 20-step samples already
    almost agree; the student therefore starts from perturbed LoRA weights (B ≠ 0), i.e. away from the
    teacher, as a real student's few-step samples are. The distance must fall by at least 12% (it falls by
    44-68%); measured margin, (1 − after/before) / 0.12 over seeds 0-2 at 1 and 2 threads: 3.7-5.6×."""
    d = Distiller(tiny_cfg(tiny_base, tmp_path / "run", "optim.generator_lr=1e-3", "optim.fake_lr=4e-3",
                           "optim.batch_size=16", f"run.seed={outcome_seed}", recipe=MEASURED_RECIPE),
                  log=lambda *a: None)
    g = torch.Generator().manual_seed(outcome_seed)
    with torch.no_grad():
        for name, p in d.teacher.transformer.named_parameters():
            if ".student." in name and "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    prompts = d.train_prompts[:8] * 2
    seeds = list(range(500, 516))
    before = _distance_to_teacher(d, prompts, seeds)
    for _ in range(30):
        d.iteration()
    after = _distance_to_teacher(d, prompts, seeds)
    assert_margin(1 - after / before, 0.12, "student-teacher distance: relative fall", before=before, after=after)


@pytest.mark.parametrize("targets", ["attention", "attention_ff"])
def test_stock_diffusers_reproduces_the_exported_student(targets, tiny_base, tmp_path):
    out = tmp_path / "run"
    cfg = prepare_run_dir(tiny_cfg(tiny_base, out, "run.iterations=3", "optim.generator_lr=1e-2",
                                   f"student.lora_targets={targets}", f"fake.lora_targets={targets}"), resume=False)
    d = Distiller(cfg, log=lambda *a: None)
    d.run()
    exported = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(".ff.net.2." in k for k in exported) == (targets == "attention_ff")
    fake_modules = {n for n, _ in d.teacher.transformer.named_parameters() if "lora_" in n and "fake" in n}
    assert any(".ff.net.2." in n for n in fake_modules) == (targets == "attention_ff")
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.md", "final/lora/pytorch_lora_weights.safetensors",
                 "final/sampler.json", "final/USAGE.md", "checkpoints/step-3/tensors.safetensors"):
        assert (out / name).is_file(), name
    settings = json.loads((out / "final" / "sampler.json").read_text())
    assert settings["guidance_scale"] == 1.0 and len(settings["sigmas"]) == 4 == settings["num_inference_steps"]

    samples = tmp_path / "samples"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a photo of a green triangle\na photo of a red circle\n")
    assert main(["sample", "--model", str(tiny_base), "--lora", str(out / "final" / "lora"), "--nfe", "4",
                 "--prompts", str(prompt_file), "--out", str(samples), "--seed", "7",
                 "--batch-size", "1"]) == 0  # one image per call, as the stock pipeline runs it
    records = [json.loads(l) for l in (samples / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [7, 8] and (samples / "grid.png").is_file()

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    call = dict(sigmas=settings["sigmas"], guidance_scale=settings["guidance_scale"],
                max_sequence_length=settings["max_sequence_length"], output_type="np")
    base = pipe(records[0]["prompt"], generator=torch.Generator().manual_seed(7), **call).images
    pipe.load_lora_weights(str(out / "final" / "lora"))
    for rec in records:
        stock = pipe(rec["prompt"], generator=torch.Generator().manual_seed(rec["seed"]), **call).images[0]
        ours = np.asarray(Image.open(samples / rec["file"]))
        diff = np.abs(ours.astype(int) - (stock * 255).round().astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, rec  # float rounding at .5 may flip a level
    # In floats the two agree to 1e-5 (the uint8 files may differ by one level where a value sits at .5).
    from dgpo.cli import load_model
    from tdm_r1.student import sample_student
    model = load_model(tiny_base, str(out / "final" / "lora"))
    latents = sample_student(model, model.encode_prompts([records[0]["prompt"]]), initial_noise([7], model.latent_shape),
                             settings["boundaries"])
    stock = pipe(records[0]["prompt"], generator=torch.Generator().manual_seed(7), **call).images[0]
    assert np.abs(model.decode_latents(latents, output="np")[0] - stock).max() < 1e-5
    assert np.abs(pipe(records[0]["prompt"], generator=torch.Generator().manual_seed(7), **call).images - base).max() > 1e-4, \
        "the distilled LoRA did not change the model"
    # The scheduler, fed these sigmas, visits exactly the student's boundaries.
    pipe.scheduler.set_timesteps(sigmas=settings["sigmas"])
    assert np.allclose(pipe.scheduler.sigmas[:-1].numpy(), settings["boundaries"], atol=1e-6)


def test_killed_run_resumes_exactly(tiny_base, tmp_path):
    ema = "student.ema_decay=0.9"  # the student's EMA is part of the state
    full = Distiller(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "full", "run.iterations=4", ema), False),
                     log=lambda *a: None)
    full.run()
    part = Distiller(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "part", "run.iterations=2", ema), False),
                     log=lambda *a: None)
    part.run()
    assert main(["distill", "--resume", str(tmp_path / "part"), "--set", "run.iterations=4"]) == 0
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step-4" / "tensors.safetensors"))
    assert any(key.startswith("student_ema.") for key in a)
    for key in a:
        if key.startswith(("student.", "fake.", "student_ema.")):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("argv, message", [
    (["distill", "--set", "optim.nonsense=1"], "unknown config key 'optim.nonsense'"),
    (["distill", "--set", "student.boundaries=[1.0, 0.5]"], "student.boundaries has 2 levels"),
    (["distill", "--set", "teacher.base=/nonexistent"], "no model_index.json"),
    (["sample", "--model", "/nonexistent", "--out", "x"], "no model_index.json"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    if argv[0] == "distill":
        argv = argv + ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_options_full_finetune_full_tau_huber_per_dim(tiny_base, tmp_path):
    """The options run end to end: a full-copy student (the teacher's weights stay untouched), τ up to 1 with
    the step index as a learned fake-score conditioning, pseudo-Huber distance, per-dimension weights."""
    out = tmp_path / "run"
    cfg = prepare_run_dir(tiny_cfg(tiny_base, out, "run.iterations=2", "student.mode=full", "objective.tau=full",
                                   "objective.distance=huber", "fake.importance=per_dim",
                                   "fake.updates_per_generator=2", "optim.generator_lr=1e-3"), False)
    d = Distiller(cfg, log=lambda *a: None)
    teacher_before = {n: p.detach().clone() for n, p in d.teacher.transformer.named_parameters() if "lora_" not in n}
    student_before = [p.detach().clone() for p in d.student_params]
    d.run()
    assert d.step_embed is not None and d.step_embed.abs().sum().item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(student_before, d.student_params))
    for n, p in d.teacher.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, teacher_before[n]), n
    assert (out / "final" / "pipeline" / "model_index.json").is_file()
    settings = json.loads((out / "final" / "sampler.json").read_text())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out / "final" / "pipeline"), text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red circle", sigmas=settings["sigmas"], guidance_scale=1.0, max_sequence_length=0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.isfinite(image).all()


def test_bench_tdm_rejects_a_student_folder_that_is_not_a_pipeline(tiny_base, tmp_path, capsys):
    from conftest import load_script
    bench = load_script("scripts/bench_tdm.py")
    assert bench.main(["--model", str(tiny_base), "--student", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "not a saved pipeline" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_tdm_leaves_files_it_did_not_write_alone(tiny_base, tmp_path, capsys):
    """An output name that is taken is refused before any work, whatever --overwrite says for a file the
    benchmark did not write; the user's file is unchanged."""
    from conftest import load_script
    bench = load_script("scripts/bench_tdm.py")
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "tdm_shapes_bench.json"
    mine.write_text('{"my": "results"}')
    for extra, said in (([], "already exists"), (["--overwrite"], "was not written by bench_tdm")):
        assert bench.main(["--model", str(tiny_base), "--out-dir", str(out), *extra]) == 2
        assert said in capsys.readouterr().err
    assert mine.read_text() == '{"my": "results"}'
    mine.unlink()
    (out / "tdm_shapes_bench.md").write_text("my table")
    assert bench.main(["--model", str(tiny_base), "--out-dir", str(out)]) == 2
    assert "tdm_shapes_bench.md exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tdm_shapes_bench.md"]


def test_a_tdm_run_logs_to_its_tracker(tiny_base, tmp_path):
    """run.tracker reaches TDM through the runtime, as it does DGPO: an offline W&B run in the run folder (conftest
    sets WANDB_MODE=offline; no login)."""
    out = tmp_path / "run"
    d = Distiller(prepare_run_dir(tiny_cfg(tiny_base, out, "run.iterations=1", "run.tracker=wandb"), False),
                  log=lambda *a: None)
    d.run()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), sorted(p.name for p in out.iterdir())


def test_a_tdm_run_carries_tdm_sections_only(tmp_path, capsys):
    """Config by selection: TDM-R1's sections (r1, surrogate, reward, advantage) exist only in a TDM-R1 config;
    setting one in a TDM config is one clear error; a TDM run folder saved with them (unused) still resumes."""
    import yaml
    from dgpo.config import ConfigError, to_dict
    from dgpo.runtime.run_folder import reopen_run
    from tdm_r1.cli import DEFAULT_R1_CONFIG, load_r1_config
    from tdm_r1.config import R1_SECTIONS, DistillConfig, ReinforceConfig
    tdm = load_distill_config("configs/tdm/shapes.yaml")
    assert type(tdm) is DistillConfig and not any(hasattr(tdm, s) for s in R1_SECTIONS)
    assert type(load_r1_config(DEFAULT_R1_CONFIG)) is ReinforceConfig
    with pytest.raises(ConfigError, match="section surrogate: TDM-R1's"):
        load_distill_config("configs/tdm/shapes.yaml", ["surrogate.lr=1e-3"])
    older = {**to_dict(tdm), **{k: v for k, v in to_dict(load_r1_config(DEFAULT_R1_CONFIG)).items()
                                if k in R1_SECTIONS}}
    older["r1"]["enabled"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert to_dict(reopen_run(DistillConfig, tmp_path))["student"] == to_dict(tdm)["student"]
    for command, has_r1 in (("distill", False), ("train", True)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert ("r1.init_run = " in capsys.readouterr().out) == has_r1


def test_the_released_codes_fake_score_choices(tiny_base, tmp_path):
    """fake.teacher_reg adds its weight × mean‖v_fake − v_teacher‖² to the fake score's loss (measured here on a
    fake score moved off the teacher); optim.weight_decay makes both optimisers AdamW."""
    from tdm_r1.objectives import teacher_regulariser
    d = Distiller(tiny_cfg(tiny_base, tmp_path / "run", "fake.teacher_reg=0.5", "optim.weight_decay=1e-4",
                           "objective.tau=full", "objective.tau_shift=3", "objective.tau_margin=0.02"),
                  log=lambda *a: None)
    assert all(type(getattr(opt, "optimizer", opt)) is torch.optim.AdamW for opt in (d.gen_opt, d.fake_opt))
    with torch.no_grad():
        for p in d.fake_params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    r = d.rollout(d.sample_prompts(4))
    points = d.trajectory_points(r)
    with_reg, _ = d.fake_loss(r, points)
    d.cfg.fake.teacher_reg = 0.0
    without, _ = d.fake_loss(r, points)
    with torch.no_grad():
        with d.as_fake() as fake:
            v_f = fake.velocity(points["x_tau"], points["tau"], d.fake_embeds(r.embeds, points["k"]))
        with d.as_teacher() as teacher:
            v_t = teacher.velocity(points["x_tau"], points["tau"], r.embeds)
    reg = teacher_regulariser(v_f, v_t).item()
    assert reg > 1e-6 and with_reg.item() == pytest.approx(without.item() + 0.5 * reg, rel=1e-5)


@pytest.mark.slow
def test_bench_tdm_over_seed_sets_pairs_every_row_with_the_teacher(tiny_base, tmp_path, capsys):
    """--seed-sets N: every row is evaluated on the same N disjoint seed sets; a row's shapes-geneval is the mean
    over them and its gain the paired difference against the first row (the teacher: exactly 0 against itself).
    Two students (K = 4 and K = 2) share the teacher's rows: the teacher at each K, each student at its K and the
    fewer of --student-nfe, the K = 2 student's 2-step row its own levels."""
    from conftest import load_script
    runs = {}
    for name, levels in (("k4", []), ("k2", [1.0, 0.75])):
        runs[name] = tmp_path / name
        cfg = tiny_cfg(tiny_base, runs[name], "run.iterations=1", f"student.nfe={len(levels) or 4}",
                       f"student.boundaries={levels}")
        Distiller(prepare_run_dir(cfg, False), log=lambda *a: None).run()
    bench = load_script("scripts/bench_tdm.py")
    assert bench.main(["--model", str(tiny_base), "--lora", str(runs["k4"] / "final" / "lora"),
                       "--lora", str(runs["k2"] / "final" / "lora"), "--student-nfe", "4,1",
                       "--per-prompt", "1", "--seed-sets", "2", "--speed-repeats", "1", "--batch-size", "8",
                       "--out-dir", str(tmp_path / "bench")]) == 0
    report = json.loads((tmp_path / "bench" / "tdm_shapes_bench.json").read_text())
    rows = report["results"]
    assert list(rows) == ["teacher (20 steps, CFG 1.5)", "teacher (4 steps, CFG 1.5)", "teacher (2 steps, CFG 1.5)",
                          "student k4, K=4 (4 NFE)", "student k4, K=4 (1 NFE)", "student k2, K=2 (2 NFE)",
                          "student k2, K=2 (1 NFE)"]
    assert [s["boundaries"] for s in report["settings"]["students"]][1] == [1.0, 0.75]
    assert report["settings"]["seed_sets"] == 2
    teacher, *others = rows.values()
    assert teacher["paired_vs_first"]["mean"] == 0.0
    for r in rows.values():
        assert len(r["sets"]) == 2
        assert r["geneval"] == pytest.approx(np.mean([s["geneval"] for s in r["sets"]]))
        diffs = [s["geneval"] - t["geneval"] for s, t in zip(r["sets"], teacher["sets"])]
        assert r["paired_vs_first"]["mean"] == pytest.approx(np.mean(diffs))
    assert rows["student k2, K=2 (2 NFE)"]["nfe"] == 2
    assert "vs first row (paired)" in (tmp_path / "bench" / "tdm_shapes_bench.md").read_text()


@pytest.mark.parametrize("levels", [[1.0, 0.75], [1.0]])
def test_two_and_one_step_students_are_stock_diffusers_pipelines(levels, tiny_base, tmp_path):
    """The released recipe at K = 2 and K = 1 (`--set student.nfe=K`, its levels by `student.level_shift`): the run
    exports K sigmas at the released sampler's levels, and the stock pipeline fed them gives the student's own
    K-step sample (to float rounding), and not the base's."""
    from dgpo.cli import load_model
    from tdm_r1.student import sample_student
    out = tmp_path / "run"
    k = len(levels)
    cfg = load_distill_config("configs/tdm/shapes.yaml",  # its levels: student.level_shift=3 at any K
                              [f"teacher.base={tiny_base}", f"run.out_dir={out}", *TINY_RUN, "run.iterations=2",
                               "optim.generator_lr=1e-2", f"student.nfe={k}"])
    Distiller(prepare_run_dir(cfg, resume=False), log=lambda *a: None).run()
    settings = json.loads((out / "final" / "sampler.json").read_text())
    assert settings["num_inference_steps"] == k == len(settings["sigmas"]) and settings["boundaries"] == levels

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    call = dict(sigmas=settings["sigmas"], guidance_scale=settings["guidance_scale"],
                max_sequence_length=settings["max_sequence_length"], output_type="np")
    prompt = "a photo of a green triangle"
    base = pipe(prompt, generator=torch.Generator().manual_seed(7), **call).images[0]
    pipe.load_lora_weights(str(out / "final" / "lora"))
    stock = pipe(prompt, generator=torch.Generator().manual_seed(7), **call).images[0]
    model = load_model(tiny_base, str(out / "final" / "lora"))
    latents = sample_student(model, model.encode_prompts([prompt]), initial_noise([7], model.latent_shape), levels)
    assert np.abs(model.decode_latents(latents, output="np")[0] - stock).max() < 1e-5
    assert np.abs(stock - base).max() > 1e-4, "the distilled LoRA did not change the model"


def test_level_shift_gives_levels_evenly_spaced_before_the_shift():
    """σ_j = s·u_j / (1 + (s − 1)·u_j) at u_j = 1 − j/K: at s = 3 the released sampler's levels, at the scheduler's
    shift the evenly spaced ones; 0 keeps the scheduler's own schedule."""
    from tdm_r1.student import shifted_levels
    assert shifted_levels(4, 3.0) == [1.0, 0.9, 0.75, 0.5] and shifted_levels(2, 3.0) == [1.0, 0.75]
    assert shifted_levels(1, 3.0) == [1.0]
    assert shifted_levels(4, 2.0) == pytest.approx([1.0, 6 / 7, 2 / 3, 0.4])
    assert shifted_levels(3, 1.0) == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_conditional_matching_with_full_cfg_weight_is_guided_matching(tiny_base, tmp_path):
    """objective.dm_target=conditional with objective.cfg_weight=1 moves the student exactly as matching the guided
    teacher does (the same generator loss on the same points); the released weight 0.3 moves it towards a teacher at
    a lower effective CFG, a different loss."""
    d = Distiller(tiny_cfg(tiny_base, tmp_path / "run", "optim.generator_lr=0", "optim.weight_decay=0",
                           "teacher.guidance_scale=3"), log=lambda *a: None)
    r = d.rollout(d.sample_prompts(4))
    state = d.gen.get_state()

    def loss(target, weight):
        d.cfg.objective.dm_target, d.cfg.objective.cfg_weight = target, weight
        d.gen.set_state(state)  # the same trajectory points
        return d.generator_update(r)["loss_gen"]

    guided = loss("guided", 0.3)
    assert loss("conditional", 1.0) == pytest.approx(guided, rel=1e-5)
    assert abs(loss("conditional", 0.3) / guided - 1) > 1e-3
