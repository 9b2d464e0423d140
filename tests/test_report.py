import json

import pytest

from peft_alora.report import NO_LAYER, allocation_matrix, split_module_name, write_report


def test_split_module_name_both_styles():
    assert split_module_name("base_model.model.model.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert split_module_name("transformer.h.0.attn.c_attn") == (0, "c_attn")
    assert split_module_name("model.layers.12.mlp.experts.5.w1") == (5, "w1")
    assert split_module_name("lm_head") == (None, "lm_head")
    assert split_module_name("blocks.3a.proj") == (None, "proj")


def test_allocation_matrix():
    active = {
        "m.layers.1.q": 3,
        "m.layers.0.q": 8,
        "m.layers.0.v": 0,
        "m.layers.1.v": 5,
        "lm_head": 2,
    }
    layers, types, matrix = allocation_matrix(active)
    assert layers == [NO_LAYER, 0, 1]
    assert types == ["q", "v", "lm_head"]
    assert matrix == [[0, 0, 2], [8, 0, 0], [3, 5, 0]]


def _history():
    names = [f"transformer.h.{i}.attn.{t}" for i in range(2) for t in ("c_attn", "c_proj")]
    a = dict.fromkeys(names, 4)
    h = [
        {"round": 0, "step": 0, "pruned": [], "grown": {}, "active": dict(a),
         "active_total": 16, "budget": 16, "trainable_params": 1600, "scoring_seconds": 0.0},
    ]
    a[names[1]] -= 2
    a[names[0]] += 2
    h.append({"round": 1, "step": 50, "pruned": [[names[1], 0], [names[1], 3]],
              "grown": {names[0]: 2}, "active": dict(a), "active_total": 16, "budget": 16,
              "trainable_params": 1600, "scoring_seconds": 1.5})
    a[names[3]] -= 1
    h.append({"round": 2, "step": 100, "pruned": [[names[3], 2]], "grown": {},
              "active": dict(a), "active_total": 15, "budget": 16,
              "trainable_params": 1500, "scoring_seconds": 2.0})
    return h


def test_write_report_files(tmp_path):
    history = _history()
    paths = write_report(history, tmp_path / "sub" / "report")
    assert paths["json"].name == "alora_allocation.json"
    assert paths["png"].name == "alora_allocation.png"

    data = json.loads(paths["json"].read_text())
    assert data["history"] == history
    assert [r["round"] for r in data["history"]] == [0, 1, 2]
    summary = data["summary"]
    assert summary["rounds"] == 2
    assert summary["budget"] == 16
    assert summary["final_active_total"] == 15
    assert summary["final_per_type_totals"] == {"c_attn": 10, "c_proj": 5}
    assert summary["initial_per_type_totals"] == {"c_attn": 8, "c_proj": 8}
    assert summary["total_scoring_seconds"] == pytest.approx(3.5)

    raw = paths["png"].read_bytes()
    assert len(raw) > 0
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_write_report_empty_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_report([], tmp_path)


def test_write_report_with_loss_curve(tmp_path):
    history = [
        {"round": 0, "step": 0, "pruned": [], "grown": {}, "active": {"model.layers.0.q_proj": 2}, "active_total": 2,
         "budget": 2, "trainable_params": 10, "scoring_seconds": 0.0},
        {"round": 1, "step": 4, "pruned": [["model.layers.0.q_proj", 1]], "grown": {}, "active":
         {"model.layers.0.q_proj": 1}, "active_total": 1, "budget": 2, "trainable_params": 5, "scoring_seconds": 0.5},
    ]
    paths = write_report(history, tmp_path, loss_curve=[(2, 3.5), (4, 3.1), (6, 2.9)])
    data = json.loads(paths["json"].read_text())
    assert data["loss_curve"] == [[2, 3.5], [4, 3.1], [6, 2.9]]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
