"""Every model family's backbone and text encoders shard (FSDP2 ``fully_shard`` per ``_no_split_modules`` block,
adapters left whole) and give the same prompt encodings, CFG velocity and LoRA gradients as unsharded: SD3 (the
shapes base: CLIP encoders), FLUX.1-dev (CLIP + T5, guidance embedding) and Z-Image (Qwen3). One process in a
one-rank group checks the three families in turn, each loaded fresh (one interpreter: its start, importing torch
and diffusers, costs more than a family's check); the multi-process runs are in tests/test_multiprocess.py."""

import os
import subprocess
import sys

import pytest

from dgpo.models.tiny_pipelines import build_tiny_flux, build_tiny_zimage

CHECK = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from dgpo.models.adapters import AdapterRoles
from dgpo.models.families import load_model
from dgpo.runtime.sharding import shard_frozen_module

store, families = sys.argv[1], sys.argv[2:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))


def check(name, folder, resolution):
    torch.manual_seed(0)
    model = load_model(folder, resolution=resolution)
    params = AdapterRoles(model.transformer).add("policy", 2, 2, model.lora_targets("attention"), seed=0)
    for p in params:
        p.data.normal_(0.0, 0.1)  # B != 0: the output depends on the adapter

    def outputs():
        embeds = model.encode_prompts(["a photo of a red circle", "a photo of two blue squares"])
        x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
        v = model.guided_velocity(x, torch.tensor([0.7, 0.3]), embeds, 3.0)
        v.pow(2).mean().backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return embeds.tokens.detach(), v.detach(), grads

    before = outputs()
    for module in model.frozen_modules().values():
        shard_frozen_module(module, mesh, root=module is model.transformer)  # as dgpo.runtime.sharding does
    sharded = [n for m in model.frozen_modules().values() for n, p in m.named_parameters() if hasattr(p, "to_local")]
    after = outputs()
    problems = [what for what, bad in [
        ("an adapter weight was sharded", any("lora_" in n for n in sharded)),
        ("prompt encodings changed", not torch.equal(before[0], after[0])),
        ("velocity changed", not torch.equal(before[1], after[1])),
        ("LoRA gradients changed", not all(torch.equal(a, b) for a, b in zip(before[2], after[2])))] if bad]
    total = sum(1 for m in model.frozen_modules().values() for _ in m.parameters())
    print(name, "sharded", len(sharded), "of", total, "; ".join(problems) or "same", sep="|", flush=True)


for i in range(0, len(families), 3):
    check(families[i], families[i + 1], int(families[i + 2]))
dist.destroy_process_group()
'''
FAMILIES = ["sd3", "flux-dev", "zimage"]


@pytest.fixture(scope="module")
def checked(tiny_base, tmp_path_factory):
    """Each family's line from one interpreter: name|sharded|N|of|M|problems (or "same")."""
    args = []
    for name in FAMILIES:
        if name == "sd3":
            args += [name, str(tiny_base), "0"]  # its own resolution
            continue
        folder = tmp_path_factory.mktemp(name) / "pipe"
        built = build_tiny_zimage(folder) if name == "zimage" else build_tiny_flux(folder)
        args += [name, str(built), "32"]
    store = tmp_path_factory.mktemp("store") / "store"
    done = subprocess.run([sys.executable, "-c", CHECK, str(store), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.split("|")[0]: line.split("|")[1:] for line in done.stdout.splitlines() if "|" in line}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sharded_family_computes_what_the_whole_one_does(family, checked):
    said = checked[family]
    assert said[0] == "sharded" and int(said[1]) > 0 and said[-1] == "same", said
