"""The over-optimisation lab: Gao et al.'s fits, the peak comparison, and ``alignkit overopt`` end to end (tiny)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignkit.cli import main
from alignkit.models.tiny import save_tiny_models
from alignkit.pipelines.overopt import compare_peaks, empirical_peak, fit_bon, fit_rl, r_squared

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_bon_recovers_known_coefficients():
    """gold = d (0.8 - 0.3 d) exactly -> alpha 0.8, beta 0.3, R^2 1; peak d* = 0.8/0.6 = 1.3333, gold* = 0.64/1.2."""
    d = np.sqrt([math.log(n) - (n - 1) / n for n in range(1, 65)])
    fit = fit_bon(d, d * (0.8 - 0.3 * d))
    assert fit["alpha"] == pytest.approx(0.8) and fit["beta"] == pytest.approx(0.3)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["peak_d"] == pytest.approx(0.8 / 0.6) and fit["peak_gold"] == pytest.approx(0.64 / 1.2)
    noisy = d * (0.8 - 0.3 * d) + np.random.default_rng(0).normal(0, 0.01, len(d))
    fit = fit_bon(d, noisy)
    assert fit["alpha"] == pytest.approx(0.8, abs=0.05) and fit["beta"] == pytest.approx(0.3, abs=0.05)
    assert 0.9 < fit["r2"] < 1.0


def test_fit_rl_recovers_known_coefficients():
    """gold = d (0.5 - 0.2 log d), d in [0, 3] (d = 0 gives 0) -> alpha 0.5, beta 0.2; peak d* = exp(0.5/0.2 - 1)
    = e^1.5 = 4.4817, gold* = 0.2 * 4.4817 = 0.8963."""
    d = np.linspace(0, 3, 20)
    y = np.where(d > 0, d * (0.5 - 0.2 * np.log(np.where(d > 0, d, 1))), 0.0)
    fit = fit_rl(d, y)
    assert fit["alpha"] == pytest.approx(0.5) and fit["beta"] == pytest.approx(0.2) and fit["r2"] == pytest.approx(1)
    assert fit["peak_d"] == pytest.approx(math.exp(1.5)) and fit["peak_gold"] == pytest.approx(0.2 * math.exp(1.5))


def test_r_squared_and_peaks():
    """y = [1, 2, 3], y_hat = [1, 2, 4]: SS_res 1, SS_tot 2 -> R^2 0.5."""
    assert r_squared(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(0.5)
    single = empirical_peak([{"sqrt_kl": 0.0, "gold": 0.1}, {"sqrt_kl": 0.5, "gold": 0.3}, {"sqrt_kl": 1.0, "gold": 0.2}])
    assert single == {"d": 0.5, "gold": 0.3, "at_end": False}
    text = compare_peaks(single, {"d": 0.9, "gold": 0.25}, "rm_1000", "PPO")
    assert "came later" in text and "was lower" in text
    text = compare_peaks(single, {"d": 0.2, "gold": 0.4}, "rm_1000", "best-of-n")
    assert "came earlier" in text and "was higher" in text and "no turnover" not in text
    rising = empirical_peak([{"sqrt_kl": 0.0, "gold": 0.1}, {"sqrt_kl": 1.0, "gold": 0.2}])
    assert rising["at_end"] and "the ensemble: highest at the largest KL measured" in compare_peaks(single, rising,
                                                                                                  "rm_1000", "PPO")


GOLD_PY = '''
def gold(texts):
    """Deterministic and varied: few ties."""
    return [((sum(ord(ch) for ch in t) % 97) / 97.0) + 0.001 * len(t) for t in texts]
'''


def test_overopt_end_to_end_tiny(tmp_path):
    paths = save_tiny_models(tmp_path / "tiny")
    (tmp_path / "gold.py").write_text(GOLD_PY)
    out = tmp_path / "lab"
    args = ["overopt", f"output_dir={out}", f"policy={paths['policy']}", f"reward_model={paths['reward']}",
            f"gold={tmp_path / 'gold.py'}:gold", "n_collect_prompts=4", "samples_per_prompt=4", "label_sizes=[6,12]",
            "ensemble_size=2", "n_eval_prompts=3", "bon_n=4", "rl_iterations=2", "rl_eval_every=1",
            "ppo_rollout_batch_size=4", "batch_size=2", "max_new_tokens=6", "lora_layers=1", "lora_r=4",
            "value_layers=1", "max_steps=2", "mixed_precision=no", "rl_eval_samples=2", "generation_batch_size=16"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["proxies"]) == {"rm_6", "rm_12", "ensemble"}
    assert (out / "ensemble" / "model" / "ensemble.json").is_file()
    for name in ("rm_6", "rm_12", "ensemble"):
        curve = s["best_of_n"][name]["curve"]
        assert [c["n"] for c in curve] == [1, 2, 3, 4] and curve[0]["kl"] == 0.0
        assert {"alpha", "beta", "r2"} <= set(s["best_of_n"][name]["fit"])
    assert set(s["rl"]) == {"rm_12", "ensemble"}
    points = s["rl"]["ensemble"]["points"]
    assert [p["iteration"] for p in points] == [0, 1, 2]
    assert all(p["sqrt_kl"] >= 0 for p in points) and points[0]["sqrt_kl"] == 0.0
    assert len(s["statements"]) == 2 and "ensemble's measured gold peak" in s["statements"][0]
    assert (out / "overopt.png").stat().st_size > 0 and "| rm_12 |" in (out / "summary.md").read_text()
    assert main(args) == 0  # a rerun into the same directory starts afresh


def test_overopt_bad_settings_are_named(tmp_path, capsys):
    assert main(["overopt", f"output_dir={tmp_path / 'x'}", "rl_proxies=[rm_5]"]) == 2  # invalid config
    assert "rl_proxies ['rm_5'] are not proxies of this lab" in capsys.readouterr().err
    assert main(["overopt", f"output_dir={tmp_path / 'x'}", "ensemble_size=1"]) == 2
    assert "ensemble_size must be 0" in capsys.readouterr().err
