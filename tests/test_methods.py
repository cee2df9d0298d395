"""The baselines in the shared trainer: Flow-GRPO's sampler checks, each loss against its formula, and a few
epochs of every objective raising a learnable reward on a tiny model (in both directions)."""

import json
import math

import numpy as np
import pytest
import torch

from dgpo.config import ConfigError
from dgpo.methods.batch import RolloutBatch
from dgpo.models.handle import PromptEmbeds, SD3Model, load_pipeline
from dgpo.methods.losses import diffusion_dpo_loss, flow_grpo_loss, group_advantages, nft_loss, nft_optimality
from dgpo.rewards import register_reward
from dgpo.sampling.ode import sample_ode
from dgpo.sampling.sde import sample_sde
from dgpo.trainer import Trainer, load_train_config, prepare_run_dir

from conftest import TINY_BASE, TINY_BASE_CONFIG, assert_margin, load_script
from test_train import TINY_RUN


class Darkness:
    name = "test_darkness"

    def __call__(self, images, prompts):
        return 1.0 - images.reshape(len(images), -1).mean(axis=1) / 255.0


register_reward("test_darkness", Darkness, overwrite=True)


@pytest.fixture(scope="module")
def learnable_base():
    """The tiny base with a VAE trained long enough that its decoder responds to the latents (the 4-step VAE
    of ``tiny_base`` decodes every latent to nearly the same image, so no reward of images is learnable)."""
    from dgpo.cli import load_base_config
    from dgpo.worlds.shapes_base.pretrain import ensure_base
    torch.manual_seed(0)
    return ensure_base(load_base_config(TINY_BASE_CONFIG, [*TINY_BASE, "vae.steps=80"]), log=lambda *a: None)


def make_trainer(base, out, method, *extra):
    cfg = load_train_config(f"configs/{method}/shapes.yaml", [
        f"model.base={base}", f"run.out_dir={out}", "run.time_budget_min=0", *TINY_RUN,
        "rollout.prompts_per_epoch=4", "rollout.group_size=4", *extra])
    return Trainer(prepare_run_dir(cfg, False), log=lambda *a: None)


# ----------------------------------------------------------------------------------------- Flow-GRPO sampler

def test_sde_with_noise_level_zero_is_the_ode_sampler(tiny_base):
    model = SD3Model(load_pipeline(tiny_base))
    embeds = model.encode_prompts(["a photo of a red circle", "a photo of two blue squares"])
    noise = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    ode = sample_ode(model, embeds, noise, 4, 2.0, "euler")
    sde = sample_sde(model, embeds, noise, 4, 2.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.allclose(sde.final, ode, atol=1e-6, rtol=0)
    noisy = sample_sde(model, embeds, noise, 4, 2.0, 0.7, torch.Generator().manual_seed(1))
    assert (noisy.final - ode).abs().max() > 1e-2          # a > 0 really is a different (stochastic) sampler
    assert noisy.log_probs.shape == (2, 4) and torch.isfinite(noisy.log_probs).all()


def test_sde_at_a_students_levels_visits_them_and_at_noise_level_zero_is_the_ode_sampler(tiny_base):
    """Flow-GRPO on a few-step student (rollout.sigmas): its SDE walks the student's levels, one step each."""
    model = SD3Model(load_pipeline(tiny_base))
    embeds = model.encode_prompts(["a photo of a red circle", "a photo of two blue squares"])
    noise = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    levels = [1.0, 0.9, 0.75, 0.5]
    ode = sample_ode(model, embeds, noise, 0, 1.0, "euler", return_trajectory=True, sigmas=levels)
    sde = sample_sde(model, embeds, noise, 0, 1.0, 0.0, torch.Generator().manual_seed(1), sigmas=levels)
    assert torch.equal(sde.sigmas, ode.sigmas) and len(sde.sigmas) == 5 and sde.sigmas[-1] == 0
    assert torch.allclose(sde.final, ode.latents[-1], atol=1e-6, rtol=0)
    noisy = sample_sde(model, embeds, noise, 0, 1.0, 0.7, torch.Generator().manual_seed(1), sigmas=levels)
    assert noisy.log_probs.shape == (2, 4) and torch.isfinite(noisy.log_probs).all()
    assert (noisy.final - ode.latents[-1]).abs().max() > 1e-2


def test_flow_grpo_first_inner_step_is_on_policy_and_the_second_is_not(tiny_base, tmp_path, outcome_seed):
    """The first of two inner updates sees ratio 1, the second a moved policy. Measured margin of the second's
    ratio deviation over 1e-4, seeds 0-2 at 1 and 2 threads: 9.8-14.7× (the first's deviation: 0 here, 4.8e-7 on
    another CPU)."""
    tr = make_trainer(tiny_base, tmp_path / "fg", "flow_grpo", "flow_grpo.updates_per_epoch=2",
                      "flow_grpo.timestep_fraction=1.0", "optim.lr=1e-2", f"run.seed={outcome_seed}")
    prompts = tr.sample_prompts()
    latents, images, embeds, flat, extras = tr.rollout(prompts)
    rewards = tr.score(images, flat)
    ids = torch.arange(len(prompts)).repeat_interleave(tr.cfg.rollout.group_size)
    batch = RolloutBatch(latents, embeds, group_advantages(rewards, ids), ids, extras)
    first, second = tr.objective.minibatches(batch, tr.gen)
    stats = tr.objective.backward(first, tr.gen, lambda loss: loss.backward())
    # on-policy up to float rounding: the log-probabilities are recomputed on a smaller batch than the rollout's,
    # which another CPU's kernels round differently (4.8e-7 seen)
    on_policy = stats["ratio_dev"]
    assert on_policy < 1e-5 and stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["clip_frac"] == 0.0
    tr.optimizer.step()
    tr.optimizer.zero_grad()
    stats = tr.objective.backward(second, tr.gen, lambda loss: loss.backward())
    assert_margin(stats["ratio_dev"], 1e-4, "off-policy ratio deviation after one step", on_policy=on_policy)


def test_flow_grpo_config_errors_name_the_key(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="flow_grpo.noise_level"):
        make_trainer(tiny_base, tmp_path / "a", "flow_grpo", "flow_grpo.noise_level=0")
    with pytest.raises(ConfigError, match="rollout.solver"):
        make_trainer(tiny_base, tmp_path / "b", "flow_grpo", "rollout.solver=dpmpp")
    with pytest.raises(ConfigError, match="objective.name"):
        load_train_config("configs/dgpo/shapes.yaml", ["objective.name=ppo"])


# ----------------------------------------------------------------------------------------- losses = formulas

def test_flow_grpo_loss_is_its_formula():
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(32, generator=g) * 1e-3).requires_grad_()
    old = torch.randn(32, generator=g) * 1e-3
    adv = torch.randn(32, generator=g)
    kl = torch.rand(32, generator=g)
    eps = 1e-3
    loss, stats = flow_grpo_loss(lp, old, adv, eps, kl, 0.04)
    expected = 0.0
    for i in range(32):
        ratio = math.exp(lp[i].item() - old[i].item())
        expected += max(-adv[i].item() * ratio, -adv[i].item() * min(max(ratio, 1 - eps), 1 + eps)) / 32
    expected += 0.04 * kl.mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0 < stats["clip_frac"] < 1
    # Gradient: −A·ρ/B where the unclipped term is the max, 0 where the clipped (constant) one is.
    loss.backward()
    ratio = torch.exp(lp.detach() - old)
    active = (-adv * ratio) >= (-adv * ratio.clamp(1 - eps, 1 + eps))
    assert torch.allclose(lp.grad, torch.where(active, -adv * ratio / 32, torch.zeros(32)), atol=1e-7)


def test_diffusion_dpo_loss_is_its_formula():
    g = torch.Generator().manual_seed(1)
    lw, rw, ll, rl = (torch.rand(16, generator=g) for _ in range(4))
    beta = 3.0
    loss = diffusion_dpo_loss(lw, rw, ll, rl, beta)
    expected = np.mean([-math.log(1 / (1 + math.exp(beta * ((lw[i] - rw[i]) - (ll[i] - rl[i])).item())))
                        for i in range(16)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert diffusion_dpo_loss(rw, rw, rl, rl, beta).item() == pytest.approx(math.log(2))


def test_nft_loss_is_its_formula():
    g = torch.Generator().manual_seed(2)
    v_theta, v_old, target = (torch.randn(6, 2, 3, 3, generator=g) for _ in range(3))
    adv = torch.tensor([-7.0, -2.0, 0.0, 1.0, 2.5, 9.0])
    r = nft_optimality(adv, 5.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.3, 0.5, 0.6, 0.75, 1.0]))
    weight = torch.rand(6, generator=g)
    beta = 0.7
    loss = nft_loss(v_theta, v_old, target, r, beta, weight)
    expected = 0.0
    for i in range(6):
        pos = (1 - beta) * v_old[i] + beta * v_theta[i]
        neg = (1 + beta) * v_old[i] - beta * v_theta[i]
        expected += weight[i] * (r[i] * ((pos - target[i]) ** 2).mean() + (1 - r[i]) * ((neg - target[i]) ** 2).mean())
    assert loss.item() == pytest.approx(expected.item() / 6, rel=1e-5)
    # At θ = old the gradient is 2β·w·(2r − 1)·(v_old − v)/D per element: positives pull v_θ towards the data.
    v = v_old.clone().requires_grad_()
    nft_loss(v, v_old, target, r, beta, weight).backward()
    d = v_old[0].numel()
    expected_grad = (2 * beta * weight * (2 * r - 1)).view(-1, 1, 1, 1) * (v_old - target) / d / 6
    assert torch.allclose(v.grad, expected_grad, atol=1e-6)


# ----------------------------------------------------------------------------------------- rewards rise

# Epochs and learning rates that move the reward clearly within seconds on the tiny model, and the smallest
# bright-vs-dark separation each test accepts: a third of the smallest measured over seeds 0-4 under 1 and 2
# threads (scripts/diagnostics/outcome_margins.py --seeds 0,1,2,3,4 -k raise_the_training; the docstring
# below gives the measurements).
# Flow-GRPO needs more samples per step (its policy gradient is the SDE noise correlated with the advantage)
# and no KL anchor at this scale; Diffusion-DPO and DiffusionNFT move less per epoch than DGPO.
RISE = {
    "dgpo": ["run.epochs=10", "optim.lr=3e-2"],
    "diffusion_dpo": ["run.epochs=20", "optim.lr=3e-2"],
    "nft": ["run.epochs=20", "optim.lr=3e-2"],
    "flow_grpo": ["run.epochs=25", "optim.lr=3e-2", "rollout.group_size=8", "flow_grpo.kl_weight=0"],
}
RISE_REQUIRED = {"dgpo": 0.006, "diffusion_dpo": 0.0035, "nft": 0.009, "flow_grpo": 0.0035}


@pytest.mark.parametrize("method", sorted(RISE))
def test_a_few_epochs_raise_the_training_reward(method, learnable_base, tmp_path, outcome_seed):
    """Trained towards brightness the images come out brighter than trained towards darkness, from the same base
    and seed: the separation (brightness rise + darkness rise) is the objective's doing, not drift, which the
    two cancel. Measured separation over seeds 0-4 at 1 and 2 threads (min, at the worst seed; margin over
    RISE_REQUIRED): DGPO 0.020-0.072 (3.3×), Diffusion-DPO 0.011-0.021 (3.1×), DiffusionNFT 0.030-0.095 (3.3×),
    Flow-GRPO 0.012-0.052 (3.3×); the two thread counts agree to ±0.007. One direction alone moved by as
    little as 0.001 on some seeds, so each is not checked on its own."""
    rises = {}
    for reward in ("test_brightness", "test_darkness"):
        tr = make_trainer(learnable_base, tmp_path / reward, method, f"reward.name={reward}",
                          f"run.seed={outcome_seed}", *RISE[method])
        prompts = tr.train_prompts[:4]
        flat = [p for p in prompts for _ in range(4)]
        embeds = PromptEmbeds.cat([tr.embeds_of[p] for p in flat])
        noise = torch.randn((len(flat), *tr.model.latent_shape), generator=torch.Generator().manual_seed(123))

        def score():
            with torch.no_grad():
                latents = sample_ode(tr.model, embeds, noise, 2, 2.0, "euler")
            return float(np.mean(tr.reward(tr.model.decode_latents(latents), flat)))

        before = score()
        for _ in range(tr.cfg.run.epochs):
            tr.epoch()
        rises[reward] = (before, score())
    (bright_before, bright_after), (dark_before, dark_after) = rises["test_brightness"], rises["test_darkness"]
    # brightness after training towards brightness minus brightness after training towards darkness
    separation = (bright_after - bright_before) + (dark_after - dark_before)
    assert_margin(separation, RISE_REQUIRED[method], f"{method} bright-vs-dark separation",
                  bright_rise=bright_after - bright_before, dark_rise=dark_after - dark_before)


def test_dgpo_nfe_is_counted_at_the_transformer_and_equals_the_formula(tiny_base, tmp_path):
    from dgpo.trainer import nfe_per_epoch
    tr = make_trainer(tiny_base, tmp_path / "d", "dgpo", "objective.timesteps_per_sample=2",
                      "objective.reference_cfg=2.0")
    tr.epoch()
    assert tr.counters.nfe == nfe_per_epoch(tr.cfg) > 0


def test_bench_summary_times_to_target_and_ratio_to_dgpo():
    bench = load_script("scripts/bench_rl.py")
    cats = {"single_object": 0.5}
    row = lambda g, s, n: {"eval_geneval": g, "train_seconds": s, "nfe": n, "epoch": int(s), "eval_per_category": cats}
    curves = {"dgpo": [row(0.3, 0, 0), row(0.45, 60, 100), row(0.5, 120, 200)],
              "fg": [row(0.3, 0, 0), row(0.4, 60, 300), row(0.46, 180, 900)]}
    rewards = {"dgpo": [0.2] * 10 + [0.5] * 80 + [0.7] * 10, "fg": [0.4, 0.1]}
    s = bench.summarise(curves, {"dgpo": "dgpo", "fg": "flow_grpo"}, 0.9, rewards=rewards)
    assert s["methods"]["dgpo"]["train_reward"] == pytest.approx((0.2, 0.7))   # first and last tenth
    assert s["methods"]["fg"]["train_reward"] == pytest.approx((0.4, 0.1))     # ≥ 1 epoch each
    assert "| 0.200 → 0.700 |" in bench.markdown(s)
    assert s["target"] == pytest.approx(0.45)
    assert s["methods"]["dgpo"]["seconds_to_target"] == 60 and s["methods"]["dgpo"]["nfe_to_target"] == 100
    assert s["methods"]["fg"]["seconds_to_target"] == 180 and s["methods"]["fg"]["time_ratio_to_dgpo"] == 3.0
    assert "| fg (flow_grpo) |" in bench.markdown(s)
    assert s["methods"]["dgpo"]["peak"] == 0.5 and s["methods"]["fg"]["peak_seconds"] == 180
    s = bench.summarise(curves, {"dgpo": "dgpo", "fg": "flow_grpo"}, 0.9, target=0.4)   # an absolute target
    assert s["target"] == 0.4 and s["methods"]["fg"]["seconds_to_target"] == 60
    assert s["methods"]["fg"]["time_ratio_to_dgpo"] == 1.0 and "set with --target" in bench.markdown(s)
    assert bench.parse_methods("dgpo,lo=flow_grpo") == {"dgpo": "dgpo", "lo": "flow_grpo"}
    assert bench.split_overrides(["optim.lr=1", "lo:optim.lr=2"], ["dgpo", "lo"]) == (
        ["optim.lr=1"], {"dgpo": [], "lo": ["optim.lr=2"]})
    with pytest.raises(SystemExit):
        bench.parse_methods("ppo")


def test_bench_time_to_target_protocol_per_seed(tmp_path):
    """The default protocol: target = base + gain, reached at the first of two consecutive evaluations at or
    above it, ratios to DGPO on the same seed, budgets of the others from DGPO's time, "> budget" if missed."""
    from types import SimpleNamespace
    bench = load_script("scripts/bench_rl.py")
    cats = {"single_object": 0.5}
    row = lambda g, s: {"eval_geneval": g, "train_seconds": s, "nfe": 10 * s, "epoch": s, "eval_per_category": cats}
    curves = {"dgpo-seed0": [row(0.6, 0), row(0.76, 60), row(0.70, 120), row(0.76, 180), row(0.80, 240)],
              "dgpo-seed1": [row(0.6, 0), row(0.75, 120), row(0.77, 180)],
              "flow_grpo-seed0": [row(0.6, 0), row(0.76, 540), row(0.78, 720)],
              "flow_grpo-seed1": [row(0.6, 0), row(0.7, 300), row(0.8, 480)]}
    methods = {k: k.split("-seed")[0] for k in curves}
    seeds = {k: int(k[-1]) for k in curves}
    s = bench.summarise(curves, methods, 0.9, target_gain=0.15, confirm=2, seeds=seeds,
                        budgets={"flow_grpo-seed1": 8.0})
    assert s["methods"]["flow_grpo-seed1"]["time_ratio_above"] == pytest.approx(4.0)   # 8 min / DGPO's 2
    line = [row(0.6, 0), row(0.65, 60), row(0.7, 120)]                                 # +0.05 a minute
    assert bench.straight_line_minutes(line, 0.75) == pytest.approx(3.0)
    assert bench.straight_line_minutes([row(0.7, 0), row(0.65, 60), row(0.6, 120)], 0.75) is None  # falling
    backwards = bench.summarise({k: curves[k] for k in reversed(list(curves))}, methods, 0.9, target_gain=0.15,
                                confirm=2, seeds=seeds, budgets={"flow_grpo-seed1": 8.0})
    for summary in (s, backwards):  # the run's own curve, wherever it stands among the runs
        assert summary["methods"]["flow_grpo-seed1"]["straight_line_minutes"] == pytest.approx(
            bench.straight_line_minutes(curves["flow_grpo-seed1"], 0.75))
    running = bench.summarise(curves, methods, 0.9, target_gain=0.15, confirm=2, seeds=seeds,
                              budgets={"flow_grpo-seed1": 8.0}, running={"flow_grpo-seed1"})
    assert running["methods"]["flow_grpo-seed1"]["time_ratio_above"] is None
    assert "| running |" in bench.markdown(running) and "> 8 |" not in bench.markdown(running)
    assert s["target"] == pytest.approx(0.75)
    m = s["methods"]
    assert m["dgpo-seed0"]["seconds_to_target"] == 180      # 0.76 at 60 s alone does not count: 0.70 follows
    assert m["dgpo-seed1"]["seconds_to_target"] == 120 and m["dgpo-seed1"]["nfe_to_target"] == 1200
    assert m["flow_grpo-seed0"]["time_ratio_to_dgpo"] == pytest.approx(3.0)   # 540 / 180, seed 0's DGPO
    assert m["flow_grpo-seed0"]["nfe_ratio_to_dgpo"] == pytest.approx(3.0)    # 5400 / 1800 transformer evaluations
    assert m["flow_grpo-seed1"]["nfe_ratio_above"] == pytest.approx(4.0)      # its 4800 at the end / DGPO's 1200
    assert m["flow_grpo-seed1"]["seconds_to_target"] is None                 # one evaluation at the target
    table = bench.markdown(s)
    assert "> 8 | - | > 4.00 | > 4.00 |" in table and "| 3.00 | 3.00 |" in table and "the base + 0.15" in table and "two consecutive" in table
    assert "- flow_grpo-seed1: " in table and "an extrapolation" in table

    # the others' budget: 4 × DGPO's time to target on the seed, capped; the cap when DGPO missed it
    dgpo_dir = tmp_path / "dgpo"
    dgpo_dir.mkdir()
    (dgpo_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in curves["dgpo-seed0"]))
    args = SimpleNamespace(budget_minutes=None, target_gain=0.15, cap_minutes=60.0, budget_factor=4.0)
    assert bench.budget_minutes(args, "flow_grpo", dgpo_dir) == 12.0          # 4 × 3 min
    assert bench.budget_minutes(args, "dgpo", dgpo_dir) == 60.0
    args.budget_factor = 40.0
    assert bench.budget_minutes(args, "nft", dgpo_dir) == 60.0                # capped
    args.target_gain = 0.5
    assert bench.budget_minutes(args, "nft", dgpo_dir) == 60.0                # DGPO never reached it
    args.budget_minutes = 7.0
    assert bench.budget_minutes(args, "nft", dgpo_dir) == 7.0                 # a fixed budget wins


def test_bench_split_runs_wait_for_dgpo_on_their_seed(tmp_path):
    """``--runs`` trains the named runs in the benchmark's order; an unknown name, or a run whose seed's DGPO
    run has not finished and is not trained before it, is refused with one line."""
    bench = load_script("scripts/bench_rl.py")
    seeds = [0, 1]
    runs = {bench.run_name(label, seed, seeds): (label, label, seed) for seed in seeds for label in bench.METHODS}
    select = lambda names: bench.select_runs(runs, names, tmp_path, "dgpo", seeds)
    assert select("") == list(runs)
    assert select("nft-seed1,dgpo-seed1") == ["dgpo-seed1", "nft-seed1"]     # DGPO first, whatever the order
    with pytest.raises(SystemExit, match="needs dgpo-seed0 finished first"):
        select("nft-seed0")
    (tmp_path / "bench_rl" / "dgpo-seed0" / "final").mkdir(parents=True)
    assert select("nft-seed0,flow_grpo-seed0") == ["flow_grpo-seed0", "nft-seed0"]
    with pytest.raises(SystemExit, match="nft-seed2 is not a run of this benchmark"):
        select("nft-seed2")


def test_bench_runs_resume_where_they_stopped_and_finished_ones_are_kept(tiny_base, tmp_path):
    """The benchmark in pieces: a run stopped after a checkpoint continues to the same final LoRA as a run
    straight through; a finished run is read, not trained again; a run stopped before its first checkpoint
    starts again."""
    import shutil
    from safetensors.torch import load_file
    from dgpo.runtime.checkpoint import list_checkpoints
    bench = load_script("scripts/bench_rl.py")
    logs = []
    overrides = [f"model.base={tiny_base}", *TINY_RUN, "run.epochs=4", "run.time_budget_min=0"]
    run_dir = tmp_path / "bench_rl" / "dgpo"
    bench.run_method("dgpo", "dgpo", overrides, run_dir, logs.append)
    lora = run_dir / "final" / "lora" / "pytorch_lora_weights.safetensors"
    straight = load_file(str(lora))
    same = lambda: (lambda now: now.keys() == straight.keys() and all(torch.equal(now[k], straight[k]) for k in now))(
        load_file(str(lora)))

    shutil.rmtree(run_dir / "final")                       # as if killed after the checkpoint of epoch 2
    shutil.rmtree(list_checkpoints(run_dir)[-1])
    bench.run_method("dgpo", "dgpo", overrides, run_dir, logs.append)
    assert any("continuing" in line for line in logs) and same()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "loss" in r] == [1, 2, 3, 4]

    before = lora.stat().st_mtime_ns
    bench.run_method("dgpo", "dgpo", overrides, run_dir, logs.append)
    assert "finished earlier" in logs[-1] and lora.stat().st_mtime_ns == before

    for ckpt in list_checkpoints(run_dir):                 # as if killed before its first checkpoint
        shutil.rmtree(ckpt)
    shutil.rmtree(run_dir / "final")
    bench.run_method("dgpo", "dgpo", overrides, run_dir, logs.append)
    assert same()


def test_offline_dpo_rolls_out_the_frozen_base(tiny_base, tmp_path):
    from dgpo.models.lora import adapters_disabled
    tr = make_trainer(tiny_base, tmp_path / "off", "diffusion_dpo", "diffusion_dpo.data=offline")
    with torch.no_grad():
        for p in tr.params:
            p.add_(0.5)                                     # a policy far from the base
    state = tr.gen.get_state()
    latents = tr.rollout(tr.train_prompts[:2])[0]
    tr.gen.set_state(state)
    with adapters_disabled(tr.model.transformer):
        base_latents = tr.rollout(tr.train_prompts[:2])[0]
    tr.gen.set_state(state)
    tr.cfg.diffusion_dpo.data = "online"
    online = tr.rollout(tr.train_prompts[:2])[0]
    assert torch.equal(latents, base_latents) and not torch.allclose(online, base_latents)


@pytest.mark.parametrize("method", ["flow_grpo", "nft", "dgpo+sgd"])
def test_baseline_resumes_exactly(method, tiny_base, tmp_path):
    """Objective state (Flow-GRPO's split of the batch, NFT's old policy) and the SGD optimiser's momentum
    survive a checkpoint exactly."""
    from safetensors.torch import load_file
    extra = ["run.checkpoint_every=2", "rollout.prompts_per_epoch=2", "rollout.group_size=3"]
    if method == "dgpo+sgd":
        method, extra = "dgpo", [*extra, "optim.name=sgd", "optim.lr=0.5"]
    full = make_trainer(tiny_base, tmp_path / "full", method, "run.epochs=4", *extra)
    full.run()
    part = make_trainer(tiny_base, tmp_path / "part", method, "run.epochs=2", *extra)
    part.run()
    resumed = Trainer(prepare_run_dir(part.cfg, True, ["run.epochs=4"]), log=lambda *a: None)
    resumed.run(resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step-4" / "tensors.safetensors"))
    assert a.keys() == b.keys()
    if method == "nft":
        assert any(k.startswith("nft_old.") for k in a)
    if "optim.name=sgd" in extra:
        assert isinstance(full.optimizer.optimizer, torch.optim.SGD) and any(k.endswith("momentum_buffer") for k in a)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


def test_score_groups_is_rollout_reward_advantages():
    """The shared start of every group recipe: rewards checked, consecutive groups, advantages per group."""
    from types import SimpleNamespace

    import numpy as np
    from dgpo.errors import UserError
    from dgpo.methods.batch import score_groups
    from dgpo.methods.losses import group_advantages
    images = np.zeros((6, 4, 4, 3), np.uint8)
    prompts = ["a"] * 3 + ["b"] * 3
    adv_cfg = SimpleNamespace(std="group", eps=1e-4, clip=0.0)
    scored = score_groups(lambda im, p: np.array([0.0, 1.0, 2.0, 5.0, 5.0, 5.0]), images, prompts, 3, adv_cfg, "r")
    assert scored.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    expected = group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0]), scored.group_ids, std="group", eps=1e-4)
    assert torch.allclose(scored.advantages, expected) and scored.advantages[3:].abs().max() == 0
    from dgpo.runtime.nonfinite import NonFiniteRewards  # the trainers skip that update (tests/test_train.py)
    with pytest.raises(NonFiniteRewards, match="reward 'r' answered 1 non-finite"):
        score_groups(lambda im, p: np.array([0.0, np.nan, 1.0, 1.0, 1.0, 1.0]), images, prompts, 3, adv_cfg, "r")
    with pytest.raises(UserError, match=r"returned \(5,\) values"):
        score_groups(lambda im, p: np.zeros(5), images, prompts, 3, adv_cfg, "r")
