"""The DGPO loop on a tiny base: run folder, diffusers-format LoRA, exact resume."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from conftest import assert_margin

from dgpo.cli import main
from dgpo.runtime.metrics import gain_against_noise
from dgpo.rewards import register_reward
from dgpo.trainer import Trainer, load_train_config, prepare_run_dir, scheduled_lr


class Brightness:
    """A dense test reward (mean pixel value): an untrained tiny base scores 0 on the shapes verifier for
    every rollout, which would give all-zero advantages and a trivially unchanged model."""

    name = "test_brightness"

    def __call__(self, images, prompts):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


register_reward("test_brightness", Brightness, overwrite=True)

TINY_RUN = [
    "rollout.prompts_per_epoch=2", "rollout.group_size=3", "rollout.steps=2", "rollout.guidance_scale=2.0",
    "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false", "eval.every=100", "run.checkpoint_every=2",
    "optim.micro_batch=4", "model.lora_rank=2", "model.lora_alpha=2", "optim.lr=1e-2",
    "reward.name=test_brightness", "objective.timesteps_per_sample=1",
]


def tiny_cfg(tiny_base, out, *extra):
    return load_train_config("configs/dgpo/shapes.yaml",
                             [f"model.base={tiny_base}", f"run.out_dir={out}", "run.time_budget_min=0", *TINY_RUN, *extra])


@pytest.mark.parametrize("targets", ["attention", "attention_ff"])
def test_run_folder_and_plain_diffusers_lora(targets, tiny_base, tmp_path, outcome_seed):
    """A run's folder, its diffusers-format LoRA, and stock diffusers with the LoRA loaded: the model changed
    and the trained sampler is reproduced. The change is measured on the latents: the 4-step VAE of the tiny
    base decodes nearly every latent to the same image (the image moved by 6.7e-4, 7x the 1e-4 bound).
    Measured margin (seeds 0-2, 1 and 2 threads; max |latent change| vs 1e-4): attention 518-731x,
    attention_ff 829-1390x."""
    out = tmp_path / "run"
    cfg = prepare_run_dir(tiny_cfg(tiny_base, out, "run.epochs=2", f"model.lora_targets={targets}",
                                   f"run.seed={outcome_seed}"), resume=False)
    trainer = Trainer(cfg, log=lambda *a: None)
    from dgpo.runtime.loop import Recipe
    assert isinstance(trainer, Recipe)  # what the run calls
    trainer.run()
    for name in ("config.yaml", "metrics.jsonl", "reward_curve.png", "summary.md", "final/lora/pytorch_lora_weights.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-2" / "tensors.safetensors").is_file()
    saved = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(".ff.net.2." in k for k in saved) == (targets == "attention_ff")
    assert any(".attn.to_q." in k for k in saved)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "reward" in r] == [1, 2]
    gain = json.loads((out / "summary.json").read_text())["gain"]
    assert gain["noise"] is not None and gain["sentence"] in (out / "summary.md").read_text()
    assert rows[-1]["nfe"] > 0 and rows[-1]["train_seconds"] > 0

    # The trained LoRA changed the model, and stock diffusers reproduces our trained sampler.
    prompt = "a photo of a green triangle"
    from dgpo.evaluation.evaluate import SamplerConfig, generate
    ours, _ = generate(trainer.model, [prompt], 1, SamplerConfig(steps=3, guidance_scale=2.0), seed=5, progress=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=prompt, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=0)
    base = pipe(**call, generator=torch.Generator().manual_seed(5), output_type="latent").images
    pipe.load_lora_weights(str(out / "final" / "lora"))
    tuned_latents = pipe(**call, generator=torch.Generator().manual_seed(5), output_type="latent").images
    tuned = pipe(**call, generator=torch.Generator().manual_seed(5), output_type="np").images
    moved = float((tuned_latents - base).abs().max())
    assert_margin(moved, 1e-4, f"{targets} LoRA: max |latent change| in stock diffusers vs 1e-4")
    assert np.array_equal(ours[0], (tuned[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("weighting,schedule", [("uniform", "constant"), ("failure", "constant"),
                                                ("uniform", "cosine")])
def test_killed_run_resumes_exactly(weighting, schedule, tiny_base, tmp_path, monkeypatch):
    extra = ("run.epochs=4", f"rollout.prompt_weighting={weighting}", f"optim.lr_schedule={schedule}")
    # Uninterrupted: 4 epochs.
    full = Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "full", *extra), False), log=lambda *a: None)
    full.run()
    # Killed during epoch 4 (after the step-2 checkpoint and epoch 3's metrics row), then resumed.
    cfg = prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "killed", *extra), False)
    killed = Trainer(cfg, log=lambda *a: None)
    real_step = Trainer.train_step

    def dying_step(self):
        if self.counters.epoch == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)  # what the run calls
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0

    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-4" / "tensors.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if "reward" in l]
    ra, rb = rows(tmp_path / "full"), rows(tmp_path / "killed")
    assert [r["epoch"] for r in rb] == [1, 2, 3, 4]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    # The schedule is a function of the checkpointed counters: epoch e (1-based) steps at progress (e − 1) / 4.
    assert [r["lr"] for r in rb] == [r["lr"] for r in ra] == [
        scheduled_lr(full.cfg.optim, (e - 1) / 4) for e in range(1, 5)]


def test_cosine_schedule_matches_its_formula():
    cfg = load_train_config("configs/dgpo/shapes.yaml", ["optim.lr=1e-3", "optim.lr_schedule=cosine",
                                                          "optim.lr_min_ratio=0.1"]).optim
    for p in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert scheduled_lr(cfg, p) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p))))
    assert scheduled_lr(cfg, 0.0) == pytest.approx(1e-3) and scheduled_lr(cfg, 1.0) == pytest.approx(1e-4)
    assert scheduled_lr(cfg, 1.7) == scheduled_lr(cfg, 1.0)  # a run past its budget stays at the floor
    assert all(scheduled_lr(cfg, a / 10) > scheduled_lr(cfg, (a + 1) / 10) for a in range(10))
    constant = load_train_config("configs/dgpo/shapes.yaml", ["optim.lr=1e-3"]).optim
    assert scheduled_lr(constant, 0.7) == 1e-3


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_unknown_reward_is_a_config_error_before_any_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--set", f"run.out_dir={out}", "--set", "reward.name=shapes_sof"]) == 2
    err = capsys.readouterr().err
    assert "reward.name" in err and "'shapes_sof'" in err and "shapes_soft" in err and not out.exists()
    assert main(["train", "--set", f"run.out_dir={out}", "--set", "reward.name=remote"]) == 2
    assert "needs reward.url" in capsys.readouterr().err and not out.exists()


class NaNReward:
    name = "test_nan"

    def __call__(self, images, prompts):
        return np.full(len(images), np.nan)


register_reward("test_nan", NaNReward, overwrite=True)


def test_reward_answering_garbage_is_a_clear_error(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *sum((["--set", o] for o in [
        f"model.base={tiny_base}", "run.epochs=2", "run.time_budget_min=0", *TINY_RUN, "reward.name=test_nan",
        "optim.max_skipped_steps=0"]), [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "reward 'test_nan' answered 6 non-finite (NaN/inf) scores of 6" in err and "check the reward" in err
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def _inject_fault(trainer, monkeypatch, fault: str, epochs: set[int]) -> None:
    """On the given epoch indices: after the objective's backward every LoRA gradient is NaN (and the loss), the
    reward answers NaN for one image, or the policy's forward in the update gives NaN (a diverged run)."""
    if fault == "forward":  # the policy's training forward (grad on; rollouts are no-grad) turns NaN
        linear = next(m for m in trainer.model.transformer.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda module, args, output: output * float("nan")
                                     if torch.is_grad_enabled() and trainer.counters.epoch in epochs else None)
        return
    if fault == "reward":
        real_reward = trainer.reward

        class FaultyReward:
            def __call__(self, images, prompts):
                scores = np.asarray(real_reward(images, prompts), dtype=np.float64)
                if trainer.counters.epoch in epochs:
                    scores[1] = np.nan
                return scores

        trainer.reward = FaultyReward()
        return
    real = trainer.objective.backward

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        if trainer.counters.epoch in epochs:
            stats["loss"] = float("nan")
            for p in trainer.params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(trainer.objective, "backward", poisoned)


FAULTS = [("gradient", "no"), ("reward", "no"), ("gradient", "bf16"), ("reward", "bf16"), ("forward", "no")]


@pytest.mark.parametrize("fault,precision", FAULTS)
def test_a_non_finite_step_is_skipped_with_a_warning(fault, precision, tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    logged = []
    trainer = Trainer(prepare_run_dir(tiny_cfg(tiny_base, out, "run.epochs=4", f"model.mixed_precision={precision}"),
                                      False), log=logged.append)
    _inject_fault(trainer, monkeypatch, fault, {2})
    dtypes = set()
    linear = next(m for m in trainer.model.transformer.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    trainer.run()  # the third epoch's step is skipped; the run goes on
    assert (torch.bfloat16 in dtypes) == (precision == "bf16")  # rollouts and updates autocast; evaluation is fp32
    assert any("skipped the update of epoch 3" in line for line in logged)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in l]
    assert [r.get("skipped") for r in rows] == [None, None, 1.0, None]
    final = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.parametrize("fault,precision", FAULTS)
def test_non_finite_steps_in_a_row_stop_with_a_clear_error_and_finite_checkpoints(fault, precision, tiny_base,
                                                                                   tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = prepare_run_dir(tiny_cfg(tiny_base, out, "run.epochs=4", "optim.max_skipped_steps=1",
                                   f"model.mixed_precision={precision}"), False)
    trainer = Trainer(cfg, log=lambda *a: None)
    _inject_fault(trainer, monkeypatch, fault, {2, 3})
    from dgpo.errors import UserError
    with pytest.raises(UserError, match="2 steps in a row had a non-finite loss, gradient or reward, the last at "
                                        "epoch 4"):
        trainer.run()
    for ckpt in (out / "checkpoints").iterdir():  # step-2, and step-4 is never written
        tensors = load_file(str(ckpt / "tensors.safetensors"))
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("lora.", "optimizer")))
    assert not (out / "final").exists()


def test_epoch0_evaluation_is_cached_per_base_and_protocol(tiny_base, tmp_path, monkeypatch):
    import dgpo.trainer as T
    calls = []
    real = T.evaluate_model
    monkeypatch.setattr(T, "evaluate_model", lambda *a, **k: (calls.append(1), real(*a, **k))[1])

    def run(name, *extra):
        n = len(calls)
        Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / name, "run.epochs=1", *extra), False),
                log=lambda *a: None).run()
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        return first, len(calls) - n

    a, evals_a = run("a", "eval.seed=7")
    b, evals_b = run("b", "eval.seed=7")                                  # same base and protocol: cached
    c, evals_c = run("c", "eval.seed=8")                                  # another protocol: evaluated
    d, evals_d = run("d", "eval.seed=7", "eval.cache_initial=false")      # forced: evaluated again
    assert (evals_a, evals_b, evals_c, evals_d) == (2, 1, 2, 2)           # epoch 0 (unless cached) + the end
    assert a["epoch"] == 0 and a == b == d                                # the cache returns what evaluating does
    assert (tmp_path / "b" / "samples" / "epoch-00000.png").is_file()


def test_interim_evaluations_sample_fewer_images_and_the_result_keeps_per_prompt(tiny_base, tmp_path, monkeypatch):
    """eval.interim_per_prompt=1 with eval.per_prompt=2: the trainer samples 1 image per test prompt at the evaluations
    between the base's and the result's, without FD, 2 at those two; the base's row is the one a run without it
    writes."""
    import dgpo.trainer as T
    sizes = []
    real = T.evaluate_model
    monkeypatch.setattr(T, "evaluate_model", lambda model, cfg, *a, **k: (sizes.append(cfg.per_prompt),
                                                                           fds.append(cfg.fd),
                                                                           real(model, cfg, *a, **k))[2])
    fds = []
    extra = ("run.epochs=3", "eval.every=1", "eval.per_prompt=2", "eval.cache_initial=false", "eval.fd=true")
    Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "a", *extra, "eval.interim_per_prompt=1"), False),
            log=lambda *a: None).run()
    assert sizes == [2, 1, 1, 2]
    assert fds == [True, False, False, True]  # an FD of fewer images is biased: interim points have none
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_geneval" in r]
    assert [(r["epoch"], bool(r.get("eval_interim"))) for r in evals] == [(0, False), (1, True), (2, True), (3, False)]
    Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "b", *extra, "eval.interim_per_prompt=0"), False),
            log=lambda *a: None).run()
    assert sizes[4:] == [2, 2, 2, 2]
    plain = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if "eval_geneval" in l]
    assert plain[0] == evals[0]


def test_eval_cache_key_follows_weights_protocol_and_code(tmp_path, monkeypatch):
    import os
    from dgpo.evaluation import cache as eval_cache
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    w = base / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(b"0" * 10)
    key = eval_cache.eval_key(base, {"seed": 1})
    assert eval_cache.eval_key(base, {"seed": 1}) == key
    assert eval_cache.eval_key(base, {"seed": 2}) != key                  # protocol
    os.utime(w, ns=(1, 1))
    assert eval_cache.eval_key(base, {"seed": 1}) != key                  # retrained weights
    key = eval_cache.eval_key(base, {"seed": 1})
    code = tmp_path / "pkg"
    shutil.copytree(eval_cache.PACKAGE, code)
    monkeypatch.setattr(eval_cache, "PACKAGE", code)
    assert eval_cache.eval_key(base, {"seed": 1}) == key
    (code / "worlds" / "shapes.py").write_text((code / "worlds" / "shapes.py").read_text() + "\n# edited\n")
    assert eval_cache.eval_key(base, {"seed": 1}) != key                  # an edited verifier


def test_export_writes_a_checkpoints_lora_or_its_ema(tiny_base, tmp_path, capsys):
    # Rollouts from the EMA: final/lora holds the EMA weights, so `export --ema` of the last step must equal it.
    cfg = prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "run", "run.epochs=2", "rollout.policy=ema"), False)
    Trainer(cfg, log=lambda *a: None).run()
    run = str(tmp_path / "run")
    assert main(["export", run, "--ema", "--out", str(tmp_path / "ema")]) == 0
    assert main(["export", run, "--step", "2", "--out", str(tmp_path / "raw")]) == 0
    weights = lambda d: load_file(str(d / "pytorch_lora_weights.safetensors"))
    final, ema, raw = (weights(tmp_path / d) for d in ("run/final/lora", "ema", "raw"))
    assert final.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(final[k], ema[k]) for k in final)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # two steps moved the weights off their EMA
    capsys.readouterr()
    # Bad input: a step that was not kept, an existing folder — one clear line, nothing written.
    assert main(["export", run, "--step", "1", "--out", str(tmp_path / "x")]) == 2
    assert "keeps steps [2]" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", run, "--out", str(tmp_path / "raw")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "not a run folder" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_a_trainer_composed_from_passed_in_components(tiny_base, tmp_path):
    """A tool passes its own model and reward (the GPU speed check: an in-memory model, random rewards);
    ``close`` takes the trainer off the model, so a second trainer runs on the same model."""
    from dgpo.models.handle import SD3Model
    model = SD3Model.from_pretrained(tiny_base)
    seen = []

    def reward(images, prompts):
        seen.append(len(images))
        return np.linspace(0.0, 1.0, len(images))

    for name in ("dgpo", "nft"):
        trainer = Trainer(tiny_cfg(tiny_base, tmp_path / name, f"objective.name={name}"), log=lambda *a: None,
                          model=model, reward=reward)
        assert trainer.model is model
        row = trainer.epoch()
        assert row["rollout_s"] > 0 and row["update_s"] > 0 and 0 < row["rollout_nfe"] < row["nfe"]
        trainer.close()
        assert not getattr(model.transformer, "peft_config", None)  # no adapter left behind
    assert seen == [6, 6]


def test_a_gain_is_judged_against_its_evaluation_noise():
    base = {"eval_geneval": 0.30, "eval_geneval_se": 0.02}
    noise = 2 * (0.02 ** 2 + 0.02 ** 2) ** 0.5  # 0.0566
    clear = gain_against_noise(base, {"eval_geneval": 0.40, "eval_geneval_se": 0.02})
    assert clear["gain"] == pytest.approx(0.10) and clear["noise"] == pytest.approx(noise) and clear["beyond_noise"]
    assert "larger than the evaluation noise" in clear["sentence"]
    unclear = gain_against_noise(base, {"eval_geneval": 0.33, "eval_geneval_se": 0.02})
    assert not unclear["beyond_noise"] and "within the evaluation noise" in unclear["sentence"]
    unknown = gain_against_noise({"eval_geneval": 0.30}, {"eval_geneval": 0.40, "eval_geneval_se": 0.02})
    assert unknown["noise"] is None and unknown["beyond_noise"] is None


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumes(tiny_base, tmp_path, capsys):
    """Truncate the newest checkpoint's tensors: --resume says which checkpoint is damaged, resumes from the
    one before, and ends where the uninterrupted run ends."""
    extra = ("run.epochs=3", "run.checkpoint_every=1", "run.keep_checkpoints=3")
    full = Trainer(prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "full", *extra), False), log=lambda *a: None)
    full.run()
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "full", damaged)
    tensors = damaged / "checkpoints" / "step-3" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # truncated, as a full disk or a kill mid-copy leaves it
    capsys.readouterr()
    assert main(["train", "--resume", str(damaged)]) == 0
    out = capsys.readouterr().out
    assert "step-3" in out and "does not match the checksum" in out and "resumed from" in out and "step-2" in out
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-3" / "tensors.safetensors"))
    b = load_file(str(tensors))  # written again by the resumed epoch 3
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
