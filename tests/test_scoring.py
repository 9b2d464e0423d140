"""The exact AB-LoRA scorer against a brute-force computation with plain weight surgery."""

import copy

import pytest
import torch
from peft import get_peft_model

import peft_alora
from peft_alora.scoring import IGNORE_INDEX, ScoringSet, exact_scores, scoring_loss
from conftest import VOCAB, make_tiny_llama, random_batch


def _model():
    config = peft_alora.ALoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False)  # B != 0: every rank changes the output
    return get_peft_model(make_tiny_llama(seed=1), config).eval()


def _scoring_set():
    ids = random_batch(n=6, length=10, seed=3)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # completion-only style masking
    labels[0, 4:8] = IGNORE_INDEX  # unequal trained-token counts per example and per micro-batch
    return ScoringSet([{"input_ids": ids[:2], "labels": labels[:2]},
                       {"input_ids": ids[2:], "labels": labels[2:]}]), ids, labels


def _hf_loss(model, ids, labels):
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()  # HF: mean over trained tokens


def test_scoring_loss_is_token_mean_over_all_micro_batches():
    model = _model()
    scoring, ids, labels = _scoring_set()
    assert scoring.n_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert scoring_loss(model, scoring) == pytest.approx(_hf_loss(model, ids, labels), abs=1e-5)


def test_exact_scores_match_brute_force():
    model = _model()
    scoring, ids, labels = _scoring_set()
    layers = dict(model.base_model.gated_layers())
    ranks = [(name, slot) for name in sorted(layers) for slot in layers[name].active_slots("default")]
    gates_before = {n: l.lora_gate["default"].clone() for n, l in layers.items()}
    scores = exact_scores(model, layers, "default", scoring, ranks)
    # the scorer leaves gates untouched
    for name, layer in layers.items():
        assert torch.equal(layer.lora_gate["default"], gates_before[name])

    base = copy.deepcopy(model).unload()  # the plain base model, no adapter
    checked = 0
    for name, slot in ranks[:: max(1, len(ranks) // 6)]:  # a spread of ranks, all module types
        layer = layers[name]
        a = layer.lora_A["default"].weight[slot]
        b = layer.lora_B["default"].weight[:, slot]
        scale = layer.scaling["default"]
        # "without rho": the whole adapter, that rank's B column zeroed
        without = copy.deepcopy(model)
        dict(without.base_model.gated_layers())[name].lora_B["default"].weight.data[:, slot] = 0
        # "only rho": base weights plus that single rank-1 update
        only = copy.deepcopy(base)
        only.get_submodule(name).weight.data += scale * torch.outer(b, a)
        expected = _hf_loss(without, ids, labels) - _hf_loss(only, ids, labels)
        assert scores[(name, slot)] == pytest.approx(expected, abs=2e-5), (name, slot)
        checked += 1
    assert checked >= 6
    # scores are not all equal: the ranking carries information
    assert max(scores.values()) - min(scores.values()) > 1e-4


def test_scoring_set_errors():
    with pytest.raises(ValueError, match="no scoring data"):
        ScoringSet([])
    ids = random_batch(n=2, length=6)
    with pytest.raises(ValueError, match="no trained token"):
        ScoringSet([{"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}])
    with pytest.raises(ValueError, match="no 'labels'"):
        ScoringSet([{"input_ids": ids}])


def test_passes_from_a_recorded_prefix_equal_full_passes_bit_for_bit():
    """Skipping the blocks before the edited rank's block changes nothing, in any block and for both terms."""
    from peft_alora.scoring import prefix
    from peft_alora.scoring.exact import GateEditor

    model = _model()
    scoring, _, _ = _scoring_set()
    layers = dict(model.base_model.gated_layers())
    blocks, block_of = prefix.decoder_blocks(model, layers)
    assert blocks is model.base_model.model.model.layers
    assert sorted(set(block_of.values())) == list(range(len(blocks))) and set(block_of) == set(layers)
    ranks = [(name, 1) for name in sorted(layers)]
    full = {}
    editor = GateEditor(layers, "default")
    for rank in ranks:  # reference: full passes
        editor.restore()
        editor.gate(rank[0])[rank[1]] = 0.0
        without = scoring_loss(model, scoring)
        editor.only(rank)
        full[rank] = without - scoring_loss(model, scoring)
    editor.restore()
    assert exact_scores(model, layers, "default", scoring, ranks) == full
    # with room for no block output, every pass is a full one and the result is the same
    current = prefix.PrefixCache.record(model, blocks, scoring, limit_bytes=1)
    assert current.kept == {} and current.loss(model, scoring, len(blocks) - 1) == scoring_loss(model, scoring)


def test_prefix_passes_do_not_compute_the_skipped_blocks():
    from peft_alora.scoring import prefix

    model = _model()
    scoring, _, _ = _scoring_set()
    layers = dict(model.base_model.gated_layers())
    blocks, block_of = prefix.decoder_blocks(model, layers)
    current = prefix.PrefixCache.record(model, blocks, scoring)
    computed = []  # blocks whose attention ran
    handles = [b.self_attn.register_forward_hook(lambda m, a, o, i=i: computed.append(i)) for i, b in enumerate(blocks)]
    last = len(blocks) - 1
    current.loss(model, scoring, last)
    for handle in handles:
        handle.remove()
    assert computed == [last] * len(scoring.batches)
    assert all("forward" not in block.__dict__ for block in blocks)  # the originals are back
