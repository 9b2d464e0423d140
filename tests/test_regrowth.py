"""regrow_init="gradient" (default): new A rows follow the module's loss gradient; output unchanged;
the paper's random rows stay selectable."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import peft_alora
from peft_alora.allocator import RankAllocator
from peft_alora.regrowth import gradient_directions
from peft_alora.scoring import ScoringSet, scoring_loss
from conftest import make_tiny_llama, random_batch

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _model_and_scoring(**config):
    kwargs = dict(r=2, lora_alpha=4, target_modules=TARGETS, allocation_start=2, allocation_end=None,
                  allocation_interval=2, allocation_rounds=2)
    kwargs.update(config)
    model = get_peft_model(make_tiny_llama(seed=0), peft_alora.ALoRAConfig(**kwargs))
    with torch.no_grad():  # trained-looking B, so the adapter is not a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = random_batch(n=6, length=10, seed=3)
    return model, ScoringSet([{"input_ids": ids[:3], "labels": ids[:3]}, {"input_ids": ids[3:], "labels": ids[3:]}])


def _weight_gradient(model, module_name, scoring):
    """Brute force: dL/dW of the base weight (summed CE over the scoring set, as the allocator's loss)."""
    weight = model.base_model.get_gated_layer(module_name).get_base_layer().weight
    weight.requires_grad_(True)
    model.eval()
    for batch in scoring.batches:
        logits = model(input_ids=batch["input_ids"]).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum").backward()
    grad = weight.grad.detach().clone()
    weight.requires_grad_(False)
    weight.grad = None
    return grad


def test_directions_are_leading_singular_vectors_of_the_gradient_outside_the_active_rows(torch_single_thread):
    model, scoring = _model_and_scoring()
    layers = dict(model.base_model.gated_layers())
    name = "model.layers.0.self_attn.q_proj"
    got, loss = gradient_directions(model, layers, "default", {name: 2}, scoring)
    got = got[name]
    assert loss == pytest.approx(scoring_loss(model, scoring), rel=1e-6)  # the pass also measures the loss
    assert got.shape == (2, layers[name].in_features)
    assert all(p.grad is None for p in model.parameters())  # nothing leaked into .grad

    g = _weight_gradient(model, name, scoring)
    rows = layers[name].slot_weights("default")[0].detach()[layers[name].active_slots("default")]
    q, _ = torch.linalg.qr(rows.T)
    expected = torch.linalg.svd(g - g @ q @ q.T).Vh[:2]
    assert torch.allclose((got @ expected.T).abs(), torch.eye(2), atol=1e-4)  # same directions up to sign
    assert torch.allclose(got @ rows.T, torch.zeros(2, rows.shape[0]), atol=1e-5)  # new, not already covered


def test_gradient_regrowth_keeps_output_and_aims_new_rows(torch_single_thread):
    model, scoring = _model_and_scoring(regrow_init="gradient")
    allocator = RankAllocator(model, scoring, total_steps=6, seed=1)
    ids = scoring.batches[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    record = allocator.run_round(2)
    grown = record["grown_slots"]
    assert grown
    # only the pruned ranks changed the output: undo them and it is the same as before
    for module, slot in record["pruned"]:
        allocator.layers[module].lora_gate["default"][slot] = 1.0
    for module, slot in grown:
        allocator.layers[module].lora_gate["default"][slot] = 0.0
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)
    for module, slot in grown:
        assert torch.all(allocator.layers[module].slot_weights("default")[1][:, slot] == 0)


def test_gradient_rows_give_new_b_columns_more_gradient_than_random_rows(torch_single_thread):
    grads, norms = {}, {}
    for init in ("random", "gradient"):
        model, scoring = _model_and_scoring(regrow_init=init)
        allocator = RankAllocator(model, scoring, total_steps=6, seed=1)
        record = allocator.run_round(2)
        norms[init] = [float(allocator.layers[m].slot_weights("default")[0][s].norm()) for m, s in record["grown_slots"]]
        model.train()
        for batch in scoring.batches:
            model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        banks = [allocator.layers[m].slot_parameters("default", s) for m, s in record["grown_slots"]]
        grads[init] = sum(float(weight_b.grad[:, index].norm()) for _, weight_b, index in banks)
    assert grads["gradient"] > 2 * grads["random"]
    assert norms["gradient"] == pytest.approx(norms["random"], rel=1e-5)  # same length as the random row it replaces


def test_regrow_init_is_validated():
    with pytest.raises(ValueError, match="regrow_init"):
        peft_alora.ALoRAConfig(r=2, target_modules=["q_proj"], regrow_init="svd")
    assert peft_alora.ALoRAConfig(r=2, target_modules=["q_proj"]).regrow_init == "gradient"  # measured default
    assert peft_alora.ALoRAConfig(r=2, target_modules=["q_proj"], regrow_init="random").regrow_init == "random"


def test_wide_gradients_get_their_leading_directions_without_a_full_svd(torch_single_thread, monkeypatch):
    """Past EXACT_SVD_MAX_DIM a seeded subspace iteration finds them: the exact vectors (a planted spectrum with
    a gap), the same result in every call, and the global RNG untouched; below it, the full SVD as before."""
    from peft_alora import regrowth

    generator = torch.Generator().manual_seed(1)
    out, inp = 1100, 1300  # both sides above 1024
    u, _ = torch.linalg.qr(torch.randn(out, 40, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(inp, 40, generator=generator))
    spectrum = torch.cat([torch.tensor([10.0, 8.0, 6.0]), torch.linspace(1.0, 0.5, 37)])
    g = (u * spectrum) @ v.T + 1e-3 * torch.randn(out, inp, generator=generator)
    exact_svd = torch.linalg.svd
    full_svds = []
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: full_svds.append(tuple(a.shape)) or exact_svd(a, **kw))
    state = torch.random.get_rng_state()
    got = regrowth.leading_right_singular_vectors(g, 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(max(shape) <= 1024 or min(shape) <= 13 for shape in full_svds)  # only the small Rayleigh-Ritz one
    exact = exact_svd(g, full_matrices=False)[2][:3]
    assert torch.allclose((got @ exact.T).abs(), torch.eye(3), atol=1e-4)  # the exact vectors, up to sign
    assert torch.equal(got, regrowth.leading_right_singular_vectors(g, 3))
    small = g[:1024]
    assert torch.equal(regrowth.leading_right_singular_vectors(small, 2), exact_svd(small, full_matrices=False)[2][:2])
