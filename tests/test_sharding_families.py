"""Every model family's backbone and text encoders shard (FSDP2 ``fully_shard`` per ``_no_split_modules`` block,
adapters left whole) and give the same prompt encodings, CFG velocity and LoRA gradients as unsharded: SD3 (the
shapes base: CLIP encoders), FLUX.1-dev (CLIP + T5, guidance embedding) and Z-Image (Qwen3). One process in a
one-rank group, each family in its own interpreter; the multi-process runs are in tests/test_multiprocess.py."""

import os
import subprocess
import sys

import pytest

from dgpo.models.tiny_pipelines import build_tiny_flux, build_tiny_zimage

CHECK = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from dgpo.models.adapters import AdapterRoles
from dgpo.models.handle import load_model
from dgpo.sharding import shard_frozen_module

folder, store, resolution = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
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
mesh = init_device_mesh("cpu", (1,))
for module in model.frozen_modules().values():
    shard_frozen_module(module, mesh, root=module is model.transformer)  # as dgpo.sharding does
sharded = [n for m in model.frozen_modules().values() for n, p in m.named_parameters() if hasattr(p, "to_local")]
assert not any("lora_" in n for n in sharded), "an adapter weight was sharded"
after = outputs()
assert torch.equal(before[0], after[0]), "prompt encodings changed"
assert torch.equal(before[1], after[1]), "velocity changed"
assert all(torch.equal(a, b) for a, b in zip(before[2], after[2])), "LoRA gradients changed"
print("sharded", len(sharded), "of", sum(1 for m in model.frozen_modules().values() for _ in m.parameters()))
dist.destroy_process_group()
'''


@pytest.fixture(scope="module", params=["sd3", "flux-dev", "zimage"])
def family_folder(request, tiny_base, tmp_path_factory):
    if request.param == "sd3":
        return tiny_base, 0  # its own resolution
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    return (build_tiny_zimage(folder) if request.param == "zimage" else build_tiny_flux(folder)), 32


def test_a_sharded_family_computes_what_the_whole_one_does(family_folder, tmp_path):
    folder, resolution = family_folder
    done = subprocess.run([sys.executable, "-c", CHECK, str(folder), str(tmp_path / "store"), str(resolution)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout.split()
    assert said[0] == "sharded" and int(said[1]) > 0, done.stdout
