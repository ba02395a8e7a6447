"""Weak-to-strong: the auxiliary confidence loss by hand, PGR arithmetic, alignkit w2s end to end (tiny model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from alignkit import cli
from alignkit.eval.w2s import mean_ci, pgr
from alignkit.losses.w2s import adaptive_threshold, alpha_schedule, aux_confidence_loss, weak_label_ce

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pgr_arithmetic():
    """(0.8 − 0.7) / (0.9 − 0.7) = 0.5; at the ceiling 1; at the weak level 0; below it negative."""
    assert pgr(0.8, 0.7, 0.9) == pytest.approx(0.5)
    assert pgr(0.9, 0.7, 0.9) == pytest.approx(1.0) and pgr(0.7, 0.7, 0.9) == 0.0
    assert pgr(0.6, 0.7, 0.9) == pytest.approx(-0.5)
    assert math.isnan(pgr(0.8, 0.7, 0.7))


def test_mean_ci_t_interval():
    """[0.4, 0.5, 0.6]: mean 0.5, sd 0.1, t_{0.975, 2} = 4.3027 -> ± 4.3027 · 0.1 / sqrt(3) = ± 0.24841."""
    m, lo, hi = mean_ci([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5) and hi - m == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert m - lo == pytest.approx(hi - m)


def test_aux_confidence_loss_hand_computed():
    """z = [2, 0, −2, 1], y_weak = [0.9, 0.8, 0.1, 0.3]: q = share of y_weak > ½ = 0.5, so t = the 50% quantile of
    p = σ(z) = [0.8808, 0.5, 0.1192, 0.7311] = (0.5 + 0.7311)/2 = 0.6155 and ŷ = [1, 0, 0, 1].
    With softplus(x) = log(1 + e^x): CE(z, y) = y·softplus(−z) + (1 − y)·softplus(z).
    CE(z, y_weak) = [0.9·0.12693 + 0.1·2.12693, 0.69315, 0.9·0.12693 + 0.1·2.12693, 0.7·1.31326 + 0.3·0.31326]
                  = [0.32693, 0.69315, 0.32693, 1.01326];
    CE(z, ŷ)      = [0.12693, 0.69315, 0.12693, 0.31326];
    α = 0.5: the mean of the two."""
    z = torch.tensor([2.0, 0.0, -2.0, 1.0])
    y = torch.tensor([0.9, 0.8, 0.1, 0.3])
    p = torch.sigmoid(z)
    assert float(adaptive_threshold(p, y)) == pytest.approx((0.5 + 0.7310586) / 2, abs=1e-6)
    ce_weak = torch.tensor([0.326928, 0.693147, 0.326928, 1.013262])
    ce_hard = torch.tensor([0.126928, 0.693147, 0.126928, 0.313262])
    assert_close(weak_label_ce(z, y), ce_weak, atol=1e-5, rtol=0)
    assert_close(aux_confidence_loss(z, y, 0.0), ce_weak, atol=1e-5, rtol=0)
    assert_close(aux_confidence_loss(z, y, 0.5), 0.5 * ce_weak + 0.5 * ce_hard, atol=1e-5, rtol=0)
    assert_close(aux_confidence_loss(z, y, 1.0), ce_hard, atol=1e-5, rtol=0)


def test_alpha_warmup():
    assert alpha_schedule(0, 100, 0.75, 0.2) == 0.0
    assert alpha_schedule(10, 100, 0.75, 0.2) == pytest.approx(0.375)
    assert alpha_schedule(50, 100, 0.75, 0.2) == 0.75 and alpha_schedule(5, 100, 0.75, 0.0) == 0.75


@pytest.mark.parametrize("task,layers", [("sentiment", ["weak_layers=1", "strong_layer=null"]),
                                         ("hhh", ["weak_layers=0", "strong_layer=1"])])
def test_w2s_e2e_tiny(tmp_path, task, layers):
    out = tmp_path / task
    argv = ["w2s", f"task={task}", "strong_model=tiny-random", *layers, "n_train=20", "n_test=16",
            "seeds=[0,1]", "steps=20", "max_length=32", f"output_dir={out}"]
    assert cli.main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["per_seed"]) == 2 and s["n_train_half"] == 20 and s["n_test"] == 16
    for r in s["per_seed"]:
        for k in ("weak", "student", "student_aux", "ceiling"):
            assert 0 <= r[k] <= 1
        if r["ceiling"] != r["weak"]:
            assert r["pgr"] == pytest.approx((r["student"] - r["weak"]) / (r["ceiling"] - r["weak"]))
    assert set(s["results"]) >= {"pgr", "pgr_aux"} and (out / "tables.md").is_file()


def test_w2s_rejects_a_weak_model_as_deep_as_the_strong(tmp_path, capsys):
    assert cli.main(["w2s", "strong_model=tiny-random", "weak_layers=2", f"output_dir={tmp_path / 'x'}"]) == 1
    assert "weak_layers 2 must be below the strong model's 2 layers" in capsys.readouterr().err
    assert cli.main(["w2s", "strong_model=tiny-random", "weak_layers=1", f"output_dir={tmp_path / 'y'}"]) == 1
    assert "strong_layer 16 must be above weak_layers 1 and at most the strong model's 2 layers" in \
        capsys.readouterr().err


def test_features_of_a_middle_layer_equal_the_full_forward():
    """features(..., layer=0, strong_layer=1) on a 3-layer model stops after layer 1 and returns the token-mean of
    hidden_states[0] (the embeddings) and hidden_states[1] of the FULL forward; strong_layer=None is the last
    (normed) state. The model is left whole afterwards."""
    from alignkit.eval.w2s import features
    from alignkit.models.tiny import tiny_causal_lm

    model, tok = tiny_causal_lm(seed=0, num_layers=3)
    model.eval()
    texts = ["a short one", "a somewhat longer text with more words in it"]
    weak, strong = features(model, tok, texts, 0, 64, 2, strong_layer=1)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    with torch.no_grad():
        for i, t in enumerate(texts):
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            assert len(hs) == 4
            assert_close(torch.from_numpy(weak[i]), hs[0][0].mean(0), atol=1e-5, rtol=0)
            assert_close(torch.from_numpy(strong[i]), hs[1][0].mean(0), atol=1e-5, rtol=0)
            last = features(model, tok, [t], 0, 64, 1)[1][0]
            assert_close(torch.from_numpy(last), hs[3][0].mean(0), atol=1e-5, rtol=0)
    assert not np.allclose(strong, features(model, tok, texts, 0, 64, 2, strong_layer=2)[1])


def test_w2s_hhh_without_the_pairs_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """task=hhh when the BIG-bench pairs cannot be had: exit 1 with the asset's reason and how to supply them, no
    traceback."""
    from alignkit.data import builtin
    from alignkit.models.embedded import AssetError

    def missing(split):
        raise AssetError("could not download bigbench from https://x/: gone; set ALIGNKIT_BIGBENCH_TARBALL=...")

    monkeypatch.setattr(builtin, "load_hhh", missing)
    assert cli.main(["w2s", "task=hhh", "strong_model=tiny-random", "weak_layers=0", "strong_layer=1",
                     f"output_dir={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err
    assert "alignkit w2s: error: could not download bigbench from https://x/: gone; set ALIGNKIT_BIGBENCH_TARBALL" in err
    assert "Traceback" not in err
