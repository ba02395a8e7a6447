"""``alignkit w2s``: weak-to-strong generalisation (Burns et al. 2023), linear-probe setting.

    alignkit w2s task=sentiment seeds=[0,1,2,3,4]

One forward pass of the strong model over every text gives two frozen features per text (mean over its tokens):
the hidden state after the first ``weak_layers`` layers (the WEAK model: a few-layer cut of the strong one) and
the last hidden state (the STRONG model). Then, for each seed (a fresh split of the training pool and init):

1. weak supervisor: a logistic probe on weak features, trained on half A with ground truth;
2. its soft labels P(y = 1) on half B;
3. strong student on half B with the weak labels: plain CE (``losses.w2s.weak_label_ce``) and with the auxiliary
   confidence loss (``losses.w2s.aux_confidence_loss``, α warmed up from 0, adaptive threshold);
4. strong ceiling: the same probe on half B with ground truth.

Test accuracy of each, and PGR = (student − weak) / (ceiling − weak) (``pgr``), mean and 95% t-interval over seeds.

Tasks: ``sentiment`` (reply texts from BIG-bench HHH and the built-in SFT demonstrations; gold = VADER compound > 0)
and ``hhh`` (pairs; the feature of a pair is f(prompt, A) − f(prompt, B), label = A is the chosen reply, A/B order
drawn at random).
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from alignkit.config import ModelConfig, W2SConfig
from alignkit.data.tokenize import encode
from alignkit.losses.w2s import alpha_schedule, aux_confidence_loss, binary_ce, weak_label_ce
from alignkit.models.loading import load_policy, load_tokenizer
from alignkit.train.run import RunError, log, prepare_run_dir, write_summary
from alignkit.io_utils import atomic_write_text

EMBEDDED_ALIASES = {"embedded": "smollm2-135m-instruct"}


def pgr(student: float, weak: float, ceiling: float) -> float:
    """Performance gap recovered: (student − weak) / (ceiling − weak); NaN when ceiling == weak.
    pgr(0.8, 0.7, 0.9) = 0.5; a student at the ceiling recovers 1, one at the weak level 0."""
    gap = ceiling - weak
    return (student - weak) / gap if gap != 0 else float("nan")


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the t-interval mean ± t_{n-1} · sd / sqrt(n) over seeds (NaNs dropped)."""
    from scipy.stats import t

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) == 1:
        return m, float("nan"), float("nan")
    h = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


# ---------------------------------------------------------------- data
def sentiment_items() -> list[dict]:
    """Reply texts labelled 1 when VADER compound > 0 (train pool: HHH train replies + SFT demonstrations; test:
    HHH test replies)."""
    from alignkit.data.builtin import load_hhh, sft_demonstrations
    from alignkit.rewards.gold import vader_scores

    def label(texts: list[str]) -> list[dict]:
        return [{"text": t, "label": int(s > 0)} for t, s in zip(texts, vader_scores(texts))]

    train = [r[k] for r in load_hhh("train") for k in ("chosen", "rejected")]
    train += [d["completion"] for d in sft_demonstrations()]
    test = [r[k] for r in load_hhh("test") for k in ("chosen", "rejected")]
    return label(train), label(test)


def hhh_items(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pairs with A/B order drawn from ``random.Random(seed)``; label 1 when A is the chosen reply."""
    from alignkit.data.builtin import load_hhh

    rng = random.Random(seed)

    def one(r: dict) -> dict:
        flip = rng.random() < 0.5
        a, b = (r["rejected"], r["chosen"]) if flip else (r["chosen"], r["rejected"])
        return {"prompt": r["prompt"], "a": a, "b": b, "label": int(not flip)}

    return [one(r) for r in load_hhh("train")], [one(r) for r in load_hhh("test")]


def _pool(items: list[dict], n: int) -> list[dict]:
    """At most ``n`` items, drawn once with a fixed seed (features are computed only for these)."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(random.Random(0).sample(range(len(items)), n))]


# ---------------------------------------------------------------- features
class _Stop(Exception):
    """Raised by a forward hook once every wanted hidden state is captured: the deeper layers never run."""


@torch.no_grad()
def hidden_states_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layers: list[int]) -> dict[int, torch.Tensor]:
    """``{k: hidden_states[k]}`` ([b, T, d]) for each k in ``layers`` below the model's layer count (0 = the token
    embeddings, k = the output of decoder layer k), stopping the forward after the deepest one (forward hooks; the
    model is unchanged afterwards)."""
    decoder = model.get_decoder()
    modules = {k: decoder.embed_tokens if k == 0 else decoder.layers[k - 1] for k in layers}
    deepest = max(layers)
    got: dict[int, torch.Tensor] = {}

    def hook_for(k: int):
        def hook(_module, _inputs, output):
            got[k] = output[0] if isinstance(output, tuple) else output
            if k == deepest:
                raise _Stop
        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in modules.items()]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def features(model, tokenizer, texts: list[str], layer: int, max_length: int, batch_size: int,
             keep_tail: bool = False, strong_layer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled hidden states ``hidden_states[layer]`` (after ``layer`` decoder layers; 0 = the token
    embeddings) and ``hidden_states[strong_layer]`` (None: the model's last, normed, hidden state):
    ([N, d], [N, d]). With a ``strong_layer`` below the last the forward stops there (:func:`hidden_states_at`). Texts longer than
    ``max_length`` tokens keep their head (or their tail with ``keep_tail``: a reply after a long prompt)."""
    weak, strong = [], []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        ids = [(encode(tokenizer, t)[-max_length:] if keep_tail else encode(tokenizer, t)[:max_length]) or [pad]
               for t in texts[start : start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)  # [b, T]
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)  # [b, T]
        if strong_layer is None or strong_layer >= model.config.num_hidden_layers:  # the last state is normed
            hs = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            h_weak, h_strong = hs[layer], hs[-1 if strong_layer is None else strong_layer]
        else:
            got = hidden_states_at(model, input_ids, mask, [layer, strong_layer])
            h_weak, h_strong = got[layer], got[strong_layer]
        m = mask.unsqueeze(-1).float()  # [b, T, 1]
        for out, h in ((weak, h_weak), (strong, h_strong)):
            out.append(((h.float() * m).sum(1) / m.sum(1)).cpu().numpy())  # [b, d]
    return np.concatenate(weak), np.concatenate(strong)


# ---------------------------------------------------------------- probes
def train_probe(X: np.ndarray, targets: np.ndarray, loss: str, cfg: W2SConfig, seed: int) -> torch.nn.Linear:
    """A logistic probe (d -> 1) trained full-batch with Adam for ``cfg.steps`` steps on standardised features.
    ``loss``: ``gt`` / ``weak`` (CE against targets) or ``aux`` (auxiliary confidence loss, α warmed up)."""
    torch.manual_seed(seed)
    x = torch.as_tensor(X, dtype=torch.float32)  # [N, d]
    y = torch.as_tensor(targets, dtype=torch.float32)  # [N]
    head = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        z = head(x).squeeze(-1)  # [N]
        if loss == "aux":
            per = aux_confidence_loss(z, y, alpha_schedule(step, cfg.steps, cfg.aux_alpha, cfg.aux_warmup_frac))
        elif loss == "weak":
            per = weak_label_ce(z, y)
        else:
            per = binary_ce(z, y)
        opt.zero_grad()
        per.mean().backward()
        opt.step()
    return head


@torch.no_grad()
def probs(head: torch.nn.Linear, X: np.ndarray) -> np.ndarray:
    return torch.sigmoid(head(torch.as_tensor(X, dtype=torch.float32)).squeeze(-1)).numpy()


def accuracy(head, X: np.ndarray, y: np.ndarray) -> float:
    return float(((probs(head, X) > 0.5).astype(int) == y).mean())


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def one_seed(Xw: np.ndarray, Xs: np.ndarray, y: np.ndarray, Xw_test: np.ndarray, Xs_test: np.ndarray,
             y_test: np.ndarray, n_half: int, cfg: W2SConfig, seed: int) -> dict:
    """Weak, students (plain and aux) and ceiling on one split of the training pool drawn from ``seed``."""
    order = np.random.default_rng(seed).permutation(len(y))
    a, b = order[:n_half], order[n_half : 2 * n_half]
    wa, wb, wt = standardise(Xw[a], Xw[b], Xw_test)
    sb, st = standardise(Xs[b], Xs_test)
    weak = train_probe(wa, y[a], "gt", cfg, seed)
    weak_labels = probs(weak, wb)  # soft labels on half B
    res = {"weak": accuracy(weak, wt, y_test),
           "weak_label_accuracy": float(((weak_labels > 0.5).astype(int) == y[b]).mean())}
    for name, loss, targets in (("student", "weak", weak_labels), ("student_aux", "aux", weak_labels),
                                ("ceiling", "gt", y[b])):
        res[name] = accuracy(train_probe(sb, targets, loss, cfg, seed), st, y_test)
    res["pgr"] = pgr(res["student"], res["weak"], res["ceiling"])
    res["pgr_aux"] = pgr(res["student_aux"], res["weak"], res["ceiling"])
    return res


def run(cfg: W2SConfig, resume: bool = False) -> dict:
    t0 = time.time()
    out = prepare_run_dir(cfg, cfg.output_dir, resume, "w2s")
    path = EMBEDDED_ALIASES.get(cfg.strong_model, cfg.strong_model)
    tok = load_tokenizer(path)
    model = load_policy(ModelConfig(name_or_path=path), tok, trainable=False).eval()
    n_layers = model.config.num_hidden_layers
    if cfg.weak_layers >= n_layers:
        raise RunError(f"weak_layers {cfg.weak_layers} must be below the strong model's {n_layers} layers")
    if cfg.strong_layer is not None and not cfg.weak_layers < cfg.strong_layer <= n_layers:
        raise RunError(f"strong_layer {cfg.strong_layer} must be above weak_layers {cfg.weak_layers} and at most the "
                       f"strong model's {n_layers} layers (or null: its last hidden state)")
    if cfg.task == "sentiment":
        train, test = sentiment_items()
        train, test = _pool(train, 2 * cfg.n_train), _pool(test, cfg.n_test)
        texts, test_texts = [r["text"] for r in train], [r["text"] for r in test]
        (Xw, Xs), (Xw_t, Xs_t) = (features(model, tok, t, cfg.weak_layers, cfg.max_length, cfg.batch_size,
                                           strong_layer=cfg.strong_layer) for t in (texts, test_texts))
    else:
        train, test = hhh_items(0)
        train, test = _pool(train, 2 * cfg.n_train), _pool(test, cfg.n_test)

        def pair_features(items):
            fa = features(model, tok, [r["prompt"] + "\n\n" + r["a"] for r in items], cfg.weak_layers,
                          cfg.max_length, cfg.batch_size, keep_tail=True, strong_layer=cfg.strong_layer)
            fb = features(model, tok, [r["prompt"] + "\n\n" + r["b"] for r in items], cfg.weak_layers,
                          cfg.max_length, cfg.batch_size, keep_tail=True, strong_layer=cfg.strong_layer)
            return fa[0] - fb[0], fa[1] - fb[1]

        (Xw, Xs), (Xw_t, Xs_t) = pair_features(train), pair_features(test)
    y = np.array([r["label"] for r in train])
    y_t = np.array([r["label"] for r in test])
    n_half = min(cfg.n_train, len(y) // 2)
    if n_half < 4 or len(set(y.tolist())) < 2:
        raise RunError(f"w2s {cfg.task}: too few training examples ({len(y)}) or a single class")
    strong_name = "the last hidden state" if cfg.strong_layer is None else f"layer {cfg.strong_layer}"
    log(f"w2s {cfg.task}: {n_half} + {n_half} training examples, {len(y_t)} test, weak = first {cfg.weak_layers} of "
        f"{n_layers} layers, strong = {strong_name}, {len(cfg.seeds)} seeds")
    per_seed = [{"seed": s, **one_seed(Xw, Xs, y, Xw_t, Xs_t, y_t, n_half, cfg, s)} for s in cfg.seeds]
    keys = ("weak", "student", "student_aux", "ceiling", "pgr", "pgr_aux", "weak_label_accuracy")
    agg = {k: dict(zip(("mean", "ci_low", "ci_high"), mean_ci([r[k] for r in per_seed]))) for k in keys}
    summary = {"task": cfg.task, "strong_model": cfg.strong_model, "weak_layers": cfg.weak_layers,
               "strong_layer": cfg.strong_layer,
               "n_layers": n_layers, "n_train_half": n_half, "n_test": int(len(y_t)),
               "test_positive_share": float(y_t.mean()), "results": agg, "per_seed": per_seed,
               "total_s": time.time() - t0}
    lines = [f"# weak-to-strong ({cfg.task}; weak = first {cfg.weak_layers} layers of {n_layers}; strong = {strong_name}; "
             f"{len(cfg.seeds)} seeds; 95% t-interval)", "", "| | mean | 95% CI |", "|---|---|---|"]
    for k in keys:
        r = agg[k]
        lines.append(f"| {k} | {r['mean']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "tables.md", text)
    write_summary(out, summary)
    print(text)
    return summary
