"""AI judges: position-swap averaging, the CoT clamp, self-consistency, the local HF judge on a tiny model, the
OpenAI-compatible judge against a local flaky server (retries, cache, token accounting, parsed answers), and the
HHH spot-check command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from alignkit.config import JudgeConfig
from http_server import serve_in_thread
from alignkit.judges import DEFAULT_PRINCIPLE, CallableJudge, consistency_of, make_judge, self_consistency
from alignkit.judges.hf import HFJudge, option_continuations
from alignkit.judges.prompts import ANSWER_PREFIX, judging_messages, parse_verdict
from alignkit.models.tiny import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the base class: both orders, clamp, consistency
def _scripted(prompts, first, second, principles):
    """A judge that likes "good" (0.9 when shown first, 0.3 = P(first better) when shown second) and otherwise
    always prefers whichever response comes first (0.8)."""
    out = []
    for f, s in zip(first, second):
        out.append(0.9 if f == "good" else 0.3 if s == "good" else 0.8)
    return out


def test_position_swap_averaging_by_hand():
    """Item 0: A = good. p_ab = 0.9; shown second P(first better) = 0.3, so p_ba = 1 - 0.3 = 0.7;
    p_a = (0.9 + 0.7) / 2 = 0.8; no flip.
    Item 1: a pure first-position judge (0.8 in both orders): p_ab = 0.8, p_ba = 0.2, p_a = 0.5; the verdict flips.
    position_bias_rate = 1/2; first_position_preference = mean(0.9, 0.8, 1-0.7, 1-0.2) = mean(.9,.8,.3,.8) = 0.7."""
    judge = CallableJudge(_scripted)
    comp = judge.compare(["q", "q"], ["good", "x"], ["bad", "y"])
    np.testing.assert_allclose(comp.p_ab, [0.9, 0.8])
    np.testing.assert_allclose(comp.p_ba, [0.7, 0.2])
    np.testing.assert_allclose(comp.p_a, [0.8, 0.5])
    assert comp.flipped.tolist() == [False, True]
    assert comp.position_bias_rate == pytest.approx(0.5)
    assert comp.first_position_preference == pytest.approx(0.7)


def test_chain_of_thought_clamp_by_hand():
    """With chain of thought each order is clamped to [0.4, 0.6] before averaging: item 0's 0.9 -> 0.6 and
    0.3 -> 0.4 (p_ba = 0.6), so p_a = 0.6; item 1's 0.8 -> 0.6 both ways, p_a = (0.6 + 0.4) / 2 = 0.5."""
    comp = CallableJudge(_scripted, chain_of_thought=True).compare(["q", "q"], ["good", "x"], ["bad", "y"])
    np.testing.assert_allclose(comp.p_a, [0.6, 0.5])
    np.testing.assert_allclose(comp.p_ab, [0.6, 0.6])


def test_compare_rejects_bad_probabilities_and_lengths():
    with pytest.raises(ValueError, match="must return 1 probabilities in \\[0, 1\\]"):
        CallableJudge(lambda *a: [1.5]).compare(["q"], ["a"], ["b"])
    with pytest.raises(ValueError, match="1 prompts but 2 A and 1 B"):
        CallableJudge(_scripted).compare(["q"], ["a", "b"], ["c"])


def test_consistency_of_by_hand():
    """Verdicts (+,-,+), (+,+,+), (+,-,-): item 0 agrees in 3/3 pairs of draws, items 1 and 2 in 1/3 each ->
    agreement 5/9; only item 0 is unanimous -> 1/3. Mean |diff|: item 0 (.1,.2,.1), item 1 (.5,.1,.4),
    item 2 (0,.2,.2) -> 1.8 / 9 = 0.2."""
    out = consistency_of([np.array([0.9, 0.2, 0.6]), np.array([0.8, 0.7, 0.6]), np.array([0.7, 0.3, 0.4])])
    assert out["agreement"] == pytest.approx(5 / 9)
    assert out["unanimous"] == pytest.approx(1 / 3)
    assert out["mean_abs_diff"] == pytest.approx(0.2)


def test_self_consistency_asks_independent_draws():
    calls = []

    class Flaky(CallableJudge):
        def prefer_first(self, prompts, first, second, principles, sample=0):
            calls.append(sample)
            return np.full(len(prompts), 0.9 if sample % 2 else 0.1)  # draws 1, 3 prefer first; draw 2 second

    out = self_consistency(Flaky(None), ["q"] * 4, ["a"] * 4, ["b"] * 4, repeats=3)
    assert sorted(set(calls)) == [1, 2, 3]  # both orders of each draw, never the configured (sample 0) answer
    # each draw prefers the first-shown in both orders -> p_a = 0.5 (a tie) every time: verdicts agree
    assert out["agreement"] == 1.0 and out["position_bias_rate"] == 1.0


# ---------------------------------------------------------------- prompts and parsing
def test_judging_prompt_and_verdict_parsing():
    (msg,) = judging_messages("Hi?", "first answer", "second answer", "Which is kinder?")
    assert "(A) first answer" in msg["content"] and "(B) second answer" in msg["content"]
    assert "Which is kinder?" in msg["content"] and "Human: Hi?" in msg["content"]
    assert parse_verdict("(B)") == "B" and parse_verdict("A") == "A" and parse_verdict(" (A) because") == "A"
    assert parse_verdict("I cannot decide") is None and parse_verdict("Both are fine") is None
    cot = "(A) is terse and (B) is rude. Therefore, the better response is (A)."
    assert parse_verdict(cot, chain_of_thought=True) == "A"
    assert parse_verdict("first (B) then (A)", chain_of_thought=True) == "A"


# ---------------------------------------------------------------- the local HF judge on the tiny model
@pytest.fixture(scope="module")
def tiny_judge():
    model, tok = tiny_causal_lm(seed=3)
    model.eval()
    return HFJudge(model, tok, batch_size=4)


def test_option_token_ids_are_the_letters(tiny_judge):
    tok = tiny_judge.tokenizer
    context = tiny_judge.render("Hi?", "one", "two", "Which is better?")
    assert context.endswith(ANSWER_PREFIX)
    prefix, conts = option_continuations(tok, context)
    assert prefix == tok.encode(context, add_special_tokens=False)
    assert conts == [[tok.convert_tokens_to_ids("A")], [tok.convert_tokens_to_ids("B")]]


def test_option_continuations_when_the_tokenizer_merges_paren_and_letter():
    class Merging:  # "(A" / "(B" are single tokens; everything else one token per character
        def encode(self, text, add_special_tokens=False):
            out, i = [], 0
            while i < len(text):
                if text[i:i + 2] in ("(A", "(B"):
                    out.append(1000 + ord(text[i + 1]))
                    i += 2
                else:
                    out.append(ord(text[i]))
                    i += 1
            return out

    prefix, conts = option_continuations(Merging(), "is (")
    assert prefix == [ord("i"), ord("s"), ord(" ")]
    assert conts == [[1000 + ord("A")], [1000 + ord("B")]]


def test_hf_judge_reads_the_normalised_next_token_probability(tiny_judge):
    """P(first better) = P(A) / (P(A) + P(B)) at the last position of the unpadded context, computed by hand."""
    tok, model = tiny_judge.tokenizer, tiny_judge.model
    context = tiny_judge.render("Hi?", "one", "two", "Which is better?")
    ids = torch.tensor([tok.encode(context, add_special_tokens=False)])
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, -1].softmax(-1)
    a, b = probs[tok.convert_tokens_to_ids("A")], probs[tok.convert_tokens_to_ids("B")]
    got = tiny_judge.prefer_first(["Hi?"], ["one"], ["two"], ["Which is better?"])
    assert got.shape == (1,) and got[0] == pytest.approx(float(a / (a + b)), abs=1e-5)


def test_hf_judge_padding_and_batch_order_do_not_change_the_probability(tiny_judge):
    """Left padding and the length-sorted batching change nothing: each item batched with others (and given
    longest first) equals the item judged alone, in the caller's order."""
    prompts = ["A much longer question " * 5, "Hi?", "Medium question?"]
    first, second = ["x", "one", "m"], ["y", "two", "n"]
    alone = [tiny_judge.prefer_first([p], [f], [s], ["P"])[0] for p, f, s in zip(prompts, first, second)]
    batched = tiny_judge.prefer_first(prompts, first, second, ["P"] * 3)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert len(set(np.round(alone, 6))) == 3  # three different answers, so an order mix-up would show
    assert tiny_judge.prefer_first([], [], [], []).shape == (0,)


def test_hf_judge_continuation_path_equals_next_token_path(tiny_judge):
    """Summed log-probs of single-token continuations (the fallback for merging tokenizers) equal the next-token
    log-probs of the fast path."""
    contexts = [tiny_judge.render("Hi?", "one", "two", "P"), tiny_judge.render("Longer question here", "a", "b", "P")]
    split = [option_continuations(tiny_judge.tokenizer, c) for c in contexts]
    with torch.no_grad():
        torch.testing.assert_close(tiny_judge._continuation_logprobs(split), tiny_judge._next_token_logprobs(split),
                                   atol=1e-5, rtol=1e-5)


def test_hf_judge_compare_both_orders_and_usage(tiny_judge):
    prompts, a, b = ["Hi?", "2+2?", "Name a colour"], ["Hello!", "4", "Blue"], ["Go away", "5", "Seven"]
    comp = tiny_judge.compare(prompts, a, b)
    for p in (comp.p_a, comp.p_ab, comp.p_ba):
        assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(comp.p_a, 0.5 * (comp.p_ab + comp.p_ba))
    # the second order really swaps the responses: P(A better | A second) = 1 - P(first better | B, A)
    np.testing.assert_allclose(comp.p_ba, 1 - tiny_judge.prefer_first(prompts, b, a, [DEFAULT_PRINCIPLE] * 3))
    assert comp.usage["requests"] == 6 and comp.usage["prompt_tokens"] > 0
    assert 0 < comp.usage["option_mass"] <= 6
    assert tiny_judge.deterministic


def test_hf_judge_chain_of_thought_generates_then_clamps():
    model, tok = tiny_causal_lm(seed=4)
    judge = HFJudge(model.eval(), tok, batch_size=2, chain_of_thought=True, max_tokens=5)
    comp = judge.compare(["Hi?", "Bye?"], ["Hello", "Bye"], ["Go", "No"])
    assert np.all((comp.p_ab >= 0.4) & (comp.p_ab <= 0.6)) and np.all((comp.p_a >= 0.4) & (comp.p_a <= 0.6))
    assert 0 < judge.usage()["completion_tokens"] <= 2 * 2 * 5
    out = self_consistency(judge, ["Hi?", "Bye?"], ["Hello", "Bye"], ["Go", "No"], repeats=2)
    assert 0 <= out["agreement"] <= 1 and out["deterministic"] == 0.0


def test_hf_judge_refuses_a_prompt_longer_than_the_model_context(tiny_judge):
    with pytest.raises(ValueError, match="more than the model's 512 positions"):
        tiny_judge.prefer_first(["q" * 600], ["a"], ["b"], ["P"])


def test_make_judge_loads_tiny_random():
    judge = make_judge(JudgeConfig(kind="hf", model="tiny-random", batch_size=2))
    p = judge.compare(["Hi?"], ["Hello"], ["Go away"]).p_a
    assert p.shape == (1,) and 0 <= p[0] <= 1


def test_make_judge_callable_error_names_the_spec():
    with pytest.raises(ValueError, match=r"judge function 'no_such_judge_mod:f'.*not found"):
        make_judge(JudgeConfig(kind="callable", fn="no_such_judge_mod:f"))


# ---------------------------------------------------------------- the OpenAI-compatible judge against a local server
def _completion(text: str, logprobs: list | None, prompt_tokens: int = 11, completion_tokens: int = 3) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
              "logprobs": None if logprobs is None else {"content": logprobs}}
    return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "judge-model", "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _tok(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    return {"token": token, "logprob": logprob, "bytes": None,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}


def scripted_app(script: list, seen: list):
    """A chat-completions endpoint that answers request i with ``script[i]``: an int status (an error body) or a
    completion dict; the last entry repeats. ``seen`` collects each request's JSON body."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        seen.append(await request.json())
        step = script[min(len(seen) - 1, len(script) - 1)]
        if isinstance(step, int):
            return JSONResponse({"error": {"message": f"scripted {step}", "type": "server_error", "param": None,
                                           "code": None}}, status_code=step)
        return JSONResponse(step)

    return app


def _remote(base_url, tmp_path, **kw):
    from alignkit.judges.remote import OpenAIJudge

    kw = {"cache_dir": tmp_path / "cache", "retry_base_delay_s": 0.01, "max_concurrency": 1, **kw}
    return OpenAIJudge("judge-model", base_url=base_url + "/v1", api_key="k", **kw)


def test_remote_judge_retries_429_then_500_then_reads_logprobs_and_caches(tmp_path):
    """Top log-probs at the letter: A ln .6, " A" ln .1, B ln .2 -> P(first better) = .7 / .9."""

    good = _completion("(A)", [_tok("(", -0.01, [("(", -0.01)]),
                               _tok("A", math.log(0.6), [("A", math.log(0.6)), (" A", math.log(0.1)),
                                                         ("B", math.log(0.2)), ("C", math.log(0.1))]),
                               _tok(")", -0.01, [(")", -0.01)])])
    seen: list = []
    with serve_in_thread(scripted_app([429, 500, good], seen)) as url:
        judge = _remote(url, tmp_path)
        p = judge.prefer_first(["Hi?"], ["Hello"], ["Go"], ["Which is better?"])
        assert p[0] == pytest.approx(0.7 / 0.9)
        assert len(seen) == 3 and seen[-1]["logprobs"] is True and seen[-1]["top_logprobs"] == 5
        assert "(A) Hello" in seen[-1]["messages"][0]["content"]
        u = judge.usage()
        assert (u["requests"], u["retries"], u["prompt_tokens"], u["completion_tokens"]) == (1, 2, 11, 3)
        assert u["answers_logprobs"] == 1 and u["cache_hits"] == 0
        # the same question again: answered from the disk cache, no request
        again = _remote(url, tmp_path)
        assert again.prefer_first(["Hi?"], ["Hello"], ["Go"], ["Which is better?"])[0] == pytest.approx(p[0])
        assert len(seen) == 3 and again.usage()["cache_hits"] == 1 and again.usage()["requests"] == 0
        # another parameter is another cache entry
        _remote(url, tmp_path, temperature=0.5).prefer_first(["Hi?"], ["Hello"], ["Go"], ["Which is better?"])
        assert len(seen) == 4
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob(".tmp-*"))


def test_remote_judge_parses_text_without_logprobs_and_counts_unparsed(tmp_path):

    answers = {"Hello": "(B) is better.", "Go": "I cannot say."}
    seen: list = []

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        content = body["messages"][0]["content"]
        first = content.split("(A) ", 1)[1].split("\n", 1)[0]
        return _completion(answers[first], None)

    with serve_in_thread(app) as url:
        judge = _remote(url, tmp_path, max_concurrency=2)
        comp = judge.compare(["Hi?"], ["Hello"], ["Go"])
    # A first: "(B)" -> P(first better) = 0; B first: unparseable -> 0.5, so p_ba = 1 - 0.5
    assert comp.p_ab.tolist() == [0.0] and comp.p_ba.tolist() == [0.5] and comp.p_a.tolist() == [0.25]
    assert comp.usage["answers_parsed"] == 1 and comp.usage["unparsed"] == 1 and comp.usage["requests"] == 2


def test_remote_judge_gives_up_after_max_retries_and_fails_fast_on_401(tmp_path):
    from alignkit.judges.remote import JudgeRequestError

    seen: list = []
    with serve_in_thread(scripted_app([503], seen)) as url:
        with pytest.raises(JudgeRequestError, match="still failing after 2 retries"):
            _remote(url, tmp_path, max_retries=2).prefer_first(["q"], ["a"], ["b"], ["p"])
        assert len(seen) == 3
    seen.clear()
    with serve_in_thread(scripted_app([401], seen)) as url:
        with pytest.raises(JudgeRequestError, match=r"refused the request \(HTTP 401\)"):
            _remote(url, tmp_path).prefer_first(["q"], ["a"], ["b"], ["p"])
        assert len(seen) == 1


def test_probability_from_logprobs_chain_of_thought_reads_the_last_letter():
    from alignkit.judges.remote import probability_from_logprobs

    content = [_tok("A", 0.0, [("A", 0.0)]), _tok(" good", -1.0, []),
               _tok(" (", 0.0, []), _tok("B", math.log(0.8), [("B", math.log(0.8)), ("A", math.log(0.2))])]
    assert probability_from_logprobs(content, chain_of_thought=True) == pytest.approx(0.2)
    assert probability_from_logprobs(content) == pytest.approx(1.0)  # direct: the first letter, only "A" on top
    assert probability_from_logprobs([_tok("Sure", -0.1, [])]) is None


def test_remote_judge_from_config_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    judge = make_judge(JudgeConfig(kind="openai", model="m", cache_dir=str(tmp_path)))
    assert judge.client.api_key == "sk-env" and judge.base_url.startswith("http://127.0.0.1:9/v1")


# ---------------------------------------------------------------- the human spot-check and `alignkit judge`
def test_agreement_summary_by_hand():
    """A = chosen. p_ab = [.9, .8, .3, .6], p_ba = [.7, .2, .1, .4] -> p_a = [.8, .5, .2, .5].
    agreement = (1 + .5 + 0 + .5) / 4 = 0.5 (exact ties count one half); chosen first: [.9,.8,.6] > .5 -> 3/4;
    chosen second: only .7 -> 1/4. Flips: pairs 1 (.8 vs .2) and 3 (.6 vs .4) -> 0.5. By category: x = pairs 0, 1
    -> (1 + .5) / 2 = .75; y = pairs 2, 3 -> (0 + .5) / 2 = .25."""
    from alignkit.judges import debias
    from alignkit.judges.agreement import summarise_agreement
    from alignkit.judges.base import Comparison

    p_a, p_ab, p_ba = debias(np.array([0.9, 0.8, 0.3, 0.6]), 1 - np.array([0.7, 0.2, 0.1, 0.4]))
    s = summarise_agreement(Comparison(p_a=p_a, p_ab=p_ab, p_ba=p_ba), ["x", "x", "y", "y"])
    assert s["agreement"] == pytest.approx(0.5)
    assert s["agreement_chosen_first"] == pytest.approx(0.75) and s["agreement_chosen_second"] == pytest.approx(0.25)
    assert s["position_bias_rate"] == pytest.approx(0.5)
    assert s["by_category"]["x"]["agreement"] == pytest.approx(0.75)
    assert s["by_category"]["y"]["agreement"] == pytest.approx(0.25)


def _write_pairs(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_judge_cli_end_to_end_with_a_callable_judge(tmp_path, monkeypatch, capsys):
    """`alignkit judge` with a scripted judge that prefers the longer response: on pairs where the human chose the
    longer one in 2 of 3 cases the agreement is 2/3, with no position bias."""
    import json

    from alignkit.cli import main

    (tmp_path / "longer_judge.py").write_text(
        "def prefer(prompts, first, second, principles):\n"
        "    return [0.9 if len(f) > len(s) else 0.1 for f, s in zip(first, second)]\n")
    data = _write_pairs(tmp_path / "pairs.jsonl", [
        {"prompt": "q1", "chosen": "a long answer", "rejected": "no", "category": "helpful"},
        {"prompt": "q2", "chosen": "a longer answer", "rejected": "x", "category": "helpful"},
        {"prompt": "q3", "chosen": "ok", "rejected": "a rambling answer", "category": "harmless"},
    ])
    monkeypatch.chdir(tmp_path)
    rc = main(["judge", "judge.kind=callable", "judge.fn=longer_judge.py:prefer", f"data.path={data}",
               "self_consistency_repeats=2", f"output_dir={tmp_path / 'run'}"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 3 and summary["agreement"] == pytest.approx(2 / 3)
    assert summary["by_category"]["helpful"]["agreement"] == 1.0 and summary["by_category"]["harmless"]["agreement"] == 0
    assert summary["position_bias_rate"] == 0 and summary["first_position_preference"] == pytest.approx(0.5)
    assert summary["self_consistency"]["agreement"] == 1.0
    lines = (tmp_path / "run" / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["p_chosen"] == pytest.approx(0.9)
    assert "agreement with the human labels" in capsys.readouterr().err + (tmp_path / "run" / "log.txt").read_text()


def test_judge_cli_with_the_tiny_random_hf_judge(tmp_path):
    import json

    from alignkit.cli import main

    data = _write_pairs(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
                                                   {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                                                   {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}])
    assert main(["judge", "judge.model=tiny-random", f"data.path={data}", f"output_dir={tmp_path / 'run'}"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 3 and 0 <= summary["agreement"] <= 1 and summary["usage"]["requests"] == 6
    assert summary["by_category"] == {"all": {"pairs": 3, "agreement": summary["agreement"],
                                              "position_bias_rate": summary["position_bias_rate"]}}


def test_judge_cli_reads_the_builtin_hhh_pairs_with_categories(tmp_path):
    """The default data: BIG-bench HHH, both splits (221 pairs; the tests' stand-in where the real pairs are not
    on the machine), categories from its `subset` field (a cheap callable judge; the pairs are too long for the
    tiny model's 512 positions)."""
    import json
    from collections import Counter

    from alignkit.cli import main
    from alignkit.data.builtin import load_hhh

    pairs = load_hhh("train") + load_hhh("test")

    (tmp_path / "coin.py").write_text("def judge(prompts, first, second, principles):\n    return [0.5] * len(prompts)\n")
    assert main(["judge", "judge.kind=callable", f"judge.fn={tmp_path / 'coin.py'}:judge",
                 f"output_dir={tmp_path / 'run'}"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == len(pairs) and summary["agreement"] == 0.5
    assert {c: v["pairs"] for c, v in summary["by_category"].items()} == Counter(r["subset"] for r in pairs)


def test_judge_cli_bad_pair_names_file_line_and_field(tmp_path, capsys):
    from alignkit.cli import main

    data = _write_pairs(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                   {"prompt": "q", "chosen": 3, "rejected": "b"}])
    assert main(["judge", "judge.model=tiny-random", f"data.path={data}", f"output_dir={tmp_path / 'r'}"]) == 1
    err = capsys.readouterr().err
    assert f"{data}, line 2, field 'chosen': expected a non-empty string, got int" in err


def test_judge_cli_reports_a_refused_endpoint(tmp_path, capsys):
    from alignkit.cli import main

    with serve_in_thread(scripted_app([401], [])) as url:
        rc = main(["judge", "judge.kind=openai", "judge.model=m", f"judge.base_url={url}/v1", "data.limit=2",
                   f"judge.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "refused the request (HTTP 401)" in err and "scripted 401" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_remote_judge_bounds_concurrency_and_times_out(tmp_path):
    """max_concurrency=2: six slow requests never have more than two in flight (and do overlap). A request slower
    than timeout_s counts as failed and is retried, then reported."""
    import asyncio

    inflight = {"now": 0, "max": 0}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        await request.json()
        inflight["now"] += 1
        inflight["max"] = max(inflight["max"], inflight["now"])
        await asyncio.sleep(0.3)
        inflight["now"] -= 1
        return _completion("(A)", None)

    with serve_in_thread(app) as url:
        judge = _remote(url, tmp_path, max_concurrency=2, cache=False)
        assert judge.prefer_first(["q"] * 6, [f"a{i}" for i in range(6)], ["b"] * 6, ["p"] * 6).tolist() == [1.0] * 6
        assert inflight["max"] == 2 and judge.usage()["requests"] == 6
        from alignkit.judges.remote import JudgeRequestError

        slow = _remote(url, tmp_path, timeout_s=0.05, max_retries=1, cache=False)
        with pytest.raises(JudgeRequestError, match="still failing after 1 retries: APITimeoutError"):
            slow.prefer_first(["q"], ["a"], ["b"], ["p"])
        assert slow.usage()["retries"] == 1
