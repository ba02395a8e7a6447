"""The labelling app's logic without a server: candidates, store (assignment, votes, undo, gold), agreement
coefficients (hand-computed), active selection, export, a simulated three-annotator project, and the commands
`alignkit sample` -> `label create` -> votes -> `label export` -> `alignkit rm` / `dpo` on the tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch.testing import assert_close

from alignkit.cli import main
from alignkit.data.formats import load_examples
from alignkit.data.io import DataError
from alignkit.label.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    majority_agreement,
    project_stats,
)
from alignkit.label.candidates import load_candidates
from alignkit.label.export import export, mean_rank_ranking
from alignkit.label.select import disagreement_order, item_disagreement, pair_disagreement, stratified_order
from alignkit.label.store import LabelError, Store, display_order, gold_score, stored_label

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- candidates
@pytest.mark.parametrize("record, task, message", [
    ({"responses": ["a", "b"]}, "pairwise", "line 2, field 'prompt': missing required field"),
    ({"prompt": "p", "responses": ["a"]}, "pairwise", "line 2, field 'responses': expected a list of at least 2"),
    ({"prompt": "p", "responses": ["a", ""]}, "pairwise", "line 2, field 'responses[1]': expected a non-empty string"),
    ({"prompt": "p", "responses": ["a", "a"]}, "pairwise", "line 2, field 'responses[1]': identical to responses[0]"),
    ({"prompt": 3, "responses": ["a", "b"]}, "pairwise", "line 2, field 'prompt': expected a non-empty string or"),
    ({"prompt": [{"role": "bot", "content": "x"}], "responses": ["a", "b"]}, "pairwise", "field 'prompt[0].role'"),
    ({"prompt": "p", "responses": ["a", "b"], "models": ["m"]}, "pairwise", "field 'models': expected a list of 2"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "gold": 0}, "pairwise", "field 'gold': a pairwise gold question needs"),
    ({"prompt": "p", "responses": ["a", "b"], "gold": 2}, "pairwise", "field 'gold': expected 0 or 1"),
    ({"prompt": "p", "responses": ["a", "b"], "gold": [1, 1]}, "ranking", "field 'gold': expected a permutation of 1..2"),
    ({"prompt": "p", "responses": ["a"], "gold": [1]}, "binary", "field 'gold': expected a list of 1 bools"),
])
def test_malformed_candidates_name_line_and_field(tmp_path, record, task, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "ok", "responses": ["x", "y"]}, record])
    with pytest.raises(DataError) as e:
        load_candidates(str(path), task)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_json_line_is_named_by_the_command(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "ok", "responses": ["x", "y"]}, '{"prompt": "p", '])
    assert main(["label", "create", "--db", str(tmp_path / "l.db"), "--project", "p", "--candidates", str(path)]) == 1
    err = capsys.readouterr().err
    assert "alignkit label create: error:" in err and "line 2" in err and not (tmp_path / "l.db").exists()


# ---------------------------------------------------------------- agreement (hand-computed in the docstrings)
def test_cohen_kappa_hand_computed():
    # p_o = 3/4, p_e = 1/2*1/4 + 1/2*3/4 = 1/2 -> kappa = (3/4 - 1/2) / (1/2) = 0.5
    assert cohen_kappa(["x", "x", "y", "y"], ["x", "y", "y", "y"]) == pytest.approx(0.5)
    assert cohen_kappa(["x", "y"], ["x", "y"]) == pytest.approx(1.0)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # p_e = 1: undefined
    assert cohen_kappa([], []) is None


THREE_UNITS = {1: {1: "x", 2: "x", 3: "x"}, 2: {1: "x", 2: "x", 3: "y"}, 3: {1: "y", 2: "y", 3: "y"}}


def test_fleiss_kappa_hand_computed():
    # P_i = 1, 1/3, 1 -> 7/9; p_x = 5/9, p_y = 4/9 -> P_e = 41/81; kappa = (7/9 - 41/81)/(40/81) = 22/40
    kappa, n, r = fleiss_kappa(THREE_UNITS)
    assert kappa == pytest.approx(0.55) and (n, r) == (3, 3)
    # a unit with 2 raters is left out (Fleiss needs the same number of raters per unit)
    kappa2, n2, _ = fleiss_kappa({**THREE_UNITS, 4: {1: "x", 2: "y"}})
    assert kappa2 == pytest.approx(0.55) and n2 == 3


def test_krippendorff_alpha_hand_computed():
    # D_o = (4 mismatched ordered pairs / (3 - 1)) / 9 = 2/9; D_e = 2*5*4 / (9*8) = 5/9; alpha = 1 - 2/5 = 0.6
    alpha, n = krippendorff_alpha(THREE_UNITS)
    assert alpha == pytest.approx(0.6) and n == 3
    # missing labels are allowed: add a unit labelled by raters 1 and 2 only, x and x:
    # n = 11; D_o = 2/11; n_x = 7, n_y = 4 -> D_e = 2*7*4/(11*10) = 56/110; alpha = 1 - (2/11)/(56/110) = 1 - 20/56
    alpha2, _ = krippendorff_alpha({**THREE_UNITS, 4: {1: "x", 2: "x"}})
    assert alpha2 == pytest.approx(1 - 20 / 56)


def test_majority_agreement_leaves_the_annotator_out():
    # unit 2: annotator 3 said y, the others x -> 3 disagrees; 1 and 2 see others (x, y): no strict majority -> skipped
    agree = majority_agreement(THREE_UNITS)
    assert agree == {1: (2, 2), 2: (2, 2), 3: (2, 3)}


# ---------------------------------------------------------------- selection
def test_stratified_order_covers_every_prompt_first():
    groups = [0, 0, 0, 1, 1, 2]
    order = stratified_order(groups, seed=3)
    assert sorted(order) == list(range(6))
    assert sorted(groups[i] for i in order[:3]) == [0, 1, 2]  # one item of each prompt first
    assert sorted(groups[i] for i in order[3:5]) == [0, 1]
    assert order == stratified_order(groups, seed=3) and any(stratified_order(groups, s) != order for s in range(1, 6))


def test_pair_disagreement_hand_computed():
    # two members with opposite preferences: d = [1, -1] -> std 1; members agreeing on the margin: d = [2, 2] -> 0
    assert_close(pair_disagreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [(0, 1)]), torch.tensor([1.0]))
    assert_close(pair_disagreement(torch.tensor([[3.0, 1.0], [2.0, 0.0]]), [(0, 1)]), torch.tensor([0.0]))
    scores = torch.tensor([[0.0, 1.0, 5.0], [0.0, 3.0, 5.0]])  # [M=2, R=3]
    # pairs: (0,1): d = [-1,-3] std 1; (0,2): [-5,-5] 0; (1,2): [-4,-2] 1
    assert_close(item_disagreement(scores, [[0, 1], [0, 2], [1, 2], [0, 1, 2], [1]]),
                 torch.tensor([1.0, 0.0, 1.0, 2 / 3, 1.0]))
    order = disagreement_order([0.0, 2.0, 0.5, 2.0], [0, 1, 2, 3], seed=0)
    assert order[2:] == [2, 0] and set(order[:2]) == {1, 3}


# ---------------------------------------------------------------- store
def make_project(tmp_path, records, task="pairwise", overlap=2, gold_rate=0.0, names=("a", "b", "c"), name="p"):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    store = Store(tmp_path / "l.db")
    store.init()
    cands = load_candidates(str(path), task)
    store.create_project(name, task, cands, overlap=overlap, gold_rate=gold_rate, seed=1)
    tokens = {n: store.add_annotator(name, n) for n in names}
    project = store.project(name)
    ids = {n: store.authenticate(t).annotator_id for n, t in tokens.items()}
    return store, project, ids, tokens


def test_stored_label_maps_screen_positions_back():
    assert stored_label("pairwise", "A", [1, 0]) == "1" and stored_label("pairwise", "B", [1, 0]) == "0"
    assert stored_label("pairwise", "tie", [1, 0]) == "tie"
    # on screen: positions 0,1,2 show stored responses 2,0,1; the annotator ranks screen 1 > 2 > 0
    assert stored_label("ranking", [1, 2, 0], [2, 0, 1]) == [1, 2, 3]
    with pytest.raises(LabelError, match="A, B, tie or both_bad"):
        stored_label("pairwise", "C", [0, 1])
    with pytest.raises(LabelError, match="positions 0..2"):
        stored_label("ranking", [0, 0, 1], [0, 1, 2])
    assert gold_score("ranking", [1, 3, 2], [1, 2, 3]) == pytest.approx(2 / 3)


def test_overlap_assignment_no_annotator_sees_an_item_twice(tmp_path):
    recs = [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(4)]  # 12 pairs
    store, project, ids, _ = make_project(tmp_path, recs, overlap=2)
    seen = {n: [] for n in ids}
    for _ in range(20):
        for n, a in ids.items():
            item = store.next_item(project, a)
            if item is None:
                continue
            assert store.next_item(project, a)["id"] == item["id"]  # the open item is shown again, not a new one
            seen[n].append(item["id"])
            store.vote(project, a, item["id"], "A", f"vote-{n}-{item['id']}")
    for n in ids:
        assert len(seen[n]) == len(set(seen[n]))
    per_item = {}
    for n in ids:
        for i in seen[n]:
            per_item[i] = per_item.get(i, 0) + 1
    assert len(per_item) == 12 and set(per_item.values()) == {2}  # every item exactly k = 2 times
    assert store.next_item(project, ids["a"]) is None
    assert store.progress(project, ids["a"])["remaining"] == 0


def test_vote_is_idempotent_and_never_double_counted(tmp_path):
    store, project, ids, _ = make_project(tmp_path, [{"prompt": "p", "responses": ["x", "y"]}])
    a = ids["a"]
    item = store.next_item(project, a)
    first = store.vote(project, a, item["id"], "A", "vote-000001")
    again = store.vote(project, a, item["id"], "A", "vote-000001")  # a retried POST
    assert not first["duplicate"] and again["duplicate"]
    with pytest.raises(LabelError, match="already labelled") as e:
        store.vote(project, a, item["id"], "B", "vote-000002")
    assert e.value.status == 409
    with pytest.raises(LabelError, match="not assigned to you"):
        store.vote(project, ids["b"], item["id"], "B", "vote-000003")
    with pytest.raises(LabelError, match="already used by another vote"):
        store.vote(project, ids["b"], item["id"], "B", "vote-000001")
    assert len(store.project_data(project)["votes"]) == 1


def test_undo_puts_the_item_back_first(tmp_path):
    recs = [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(3)]
    store, project, ids, _ = make_project(tmp_path, recs, overlap=1)
    a = ids["a"]
    first = store.next_item(project, a)
    store.vote(project, a, first["id"], "A", "vote-aaaaaa1")
    second = store.next_item(project, a)
    assert second["id"] != first["id"]
    assert store.undo(project, a) == first["id"]
    assert store.next_item(project, a)["id"] == first["id"]
    store.vote(project, a, first["id"], "B", "vote-aaaaaa2")
    data = store.project_data(project)
    order = display_order(project.seed, a, first["id"], 2)
    assert [v["label"] for v in data["votes"]] == [str(order[1])]
    assert store.undo(project, ids["b"]) is None


def test_gold_questions_mixed_in_at_the_rate_and_scored(tmp_path):
    recs = [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(12)]
    recs += [{"prompt": f"g{i}", "responses": [f"right{i}", f"wrong{i}"], "gold": 0} for i in range(4)]
    store, project, ids, _ = make_project(tmp_path, recs, overlap=1, gold_rate=0.25, names=("a",))
    a, golds = ids["a"], []
    for n in range(8):
        item = store.next_item(project, a)
        golds.append(item["gold"] is not None)
        order = display_order(project.seed, a, item["id"], 2)
        # the annotator always picks the stored response 0 (the right one on gold items), except on the 2nd gold
        choice = "A" if order[0] == 0 else "B"
        if item["gold"] is not None and sum(golds) == 2:
            choice = "B" if choice == "A" else "A"
        store.vote(project, a, item["id"], choice, f"vote-g{n:05d}")
    assert golds == [False, False, False, True, False, False, False, True]  # floor((seen+1)*0.25)
    s = project_stats(project, store.project_data(project))
    row = s["annotators"][0]
    assert row["gold_n"] == 2 and row["gold_accuracy"] == pytest.approx(0.5)
    assert s["items"] == 12 and s["gold_items"] == 4


# ---------------------------------------------------------------- export
def votes_on(store, project, ids, item_index_votes):
    """Cast stored labels directly: {annotator: stored label} per item, in item order."""
    with store.connect() as con:
        item_ids = [r["id"] for r in con.execute("SELECT id FROM items WHERE project_id=? ORDER BY id", (project.id,))]
    for n, labels in enumerate(item_index_votes):
        for name, label in labels.items():
            a = ids[name]
            with store.transaction() as con:
                con.execute("INSERT INTO assignments VALUES (?,?,0,1)", (a, item_ids[n]))
                con.execute("UPDATE items SET n_done=n_done+1 WHERE id=?", (item_ids[n],))
                con.execute("INSERT INTO votes (vote_id, annotator_id, item_id, label, seconds, created_at) "
                            "VALUES (?,?,?,?,1,0)", (f"v{a}-{item_ids[n]}", a, item_ids[n], json.dumps(label)))


def test_export_pairs_soft_labels_ties_and_both_bad(tmp_path):
    recs = [{"prompt": "p0", "responses": ["x0", "y0"], "models": ["m1", "m2"]},
            {"prompt": "p1", "responses": ["x1", "y1"]}, {"prompt": "p2", "responses": ["x2", "y2"]},
            {"prompt": "p3", "responses": ["x3", "y3"]}]
    store, project, ids, _ = make_project(tmp_path, recs, overlap=3)
    votes_on(store, project, ids, [
        {"a": "1", "b": "1", "c": "tie"},        # y0 chosen: prob (2 + 0.5) / 3
        {"a": "0", "b": "1", "c": "tie"},        # 1 vs 1: no majority
        {"a": "both_bad", "b": "both_bad", "c": "0"},  # both bad is the majority: skipped
        {"a": "0", "b": "both_bad", "c": "tie"},  # x3: prob (1 + 0.5) / 2
    ])
    records, summary = export(project, store.project_data(project), "pairs")
    assert summary == {"exported": 2, "no_majority": 1, "both_bad": 1}
    r0, r3 = records
    assert (r0["chosen"], r0["rejected"], r0["chosen_model"]) == ("y0", "x0", "m2")
    assert r0["votes"] == {"chosen": 2, "rejected": 0, "tie": 1, "both_bad": 0}
    assert r0["label_prob"] == pytest.approx(2.5 / 3) and r3["label_prob"] == pytest.approx(0.75)
    path = write_jsonl(tmp_path / "prefs.jsonl", records)
    examples, _ = load_examples(str(path), "preference")  # alignkit's loader accepts the extra fields
    assert [e["chosen"] for e in examples] == ["y0", "x3"]


def test_export_ranked_and_kto(tmp_path):
    store, project, ids, _ = make_project(tmp_path, [{"prompt": "p", "responses": ["r0", "r1", "r2"]}],
                                          task="ranking", overlap=3)
    votes_on(store, project, ids, [{"a": [1, 2, 3], "b": [2, 1, 3], "c": [1, 3, 2]}])
    (rec,), _ = export(project, store.project_data(project), "ranked")
    # mean ranks [4/3, 2, 8/3] -> ranking [1, 2, 3]
    assert rec["ranking"] == [1, 2, 3] and rec["votes"]["n"] == 3
    assert mean_rank_ranking([1.5, 1.5, 3.0]) == [1, 1, 3] and mean_rank_ranking([2.0, 1.0, 2.5]) == [2, 1, 3]
    pairs, _ = export(project, store.project_data(project), "pairs")
    # pair (r0, r1): a and c rank r0 higher, b r1 -> chosen r0 with prob 2/3
    assert (pairs[0]["chosen"], pairs[0]["label_prob"]) == ("r0", pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="needs a binary project"):
        export(project, store.project_data(project), "kto")

    store2, project2, ids2, _ = make_project(tmp_path, [{"prompt": "q", "responses": ["good one", "bad one"]}],
                                             task="binary", overlap=3, name="bin")
    votes_on(store2, project2, ids2, [{"a": "good", "b": "good", "c": "bad"}, {"a": "bad", "b": "bad", "c": "bad"}])
    kto, _ = export(project2, store2.project_data(project2), "kto")
    assert [(r["completion"], r["label"], r["label_prob"]) for r in kto] == [("good one", True, pytest.approx(2 / 3)),
                                                                             ("bad one", False, 0.0)]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "kto.jsonl", kto)), "kto")
    assert [e["label"] for e in examples] == [True, False]


# ---------------------------------------------------------------- a simulated three-annotator project
def expected_pairwise_kappa(a: float, b: float) -> float:
    """Two annotators who each pick the truly better response w.p. a and b (independently) on pairs whose better
    response is on either side w.p. 1/2: p_o = ab + (1-a)(1-b); each annotator's marginals are (1/2, 1/2) so
    p_e = 1/2 and kappa = 2 p_o - 1 = (2a - 1)(2b - 1)."""
    return (2 * a - 1) * (2 * b - 1)


def implied_majority(acc: dict[str, float], name: str) -> float:
    """Agreement of ``name`` with the other two's majority, which exists where they agree: both right w.p.
    r = b*c, both wrong w.p. w = (1-b)(1-c); P(agree) = (r*a + w*(1-a)) / (r + w)."""
    b, c = (acc[n] for n in acc if n != name)
    right, wrong = b * c, (1 - b) * (1 - c)
    return (right * acc[name] + wrong * (1 - acc[name])) / (right + wrong)


def test_simulated_three_annotators_match_the_implied_agreement(tmp_path, capsys):
    acc = {"a": 0.9, "b": 0.8, "c": 0.6}
    n_items, rng = 1500, random.Random(0)
    recs = [{"prompt": f"p{i}", "responses": [f"x{i}", f"y{i}"]} for i in range(n_items)]
    recs += [{"prompt": f"g{i}", "responses": [f"gx{i}", f"gy{i}"], "gold": i % 2} for i in range(500)]
    store, project, ids, _ = make_project(tmp_path, recs, overlap=3, gold_rate=0.2)
    truth = {}
    with store.connect() as con:
        for r in con.execute("SELECT id, record, gold FROM items"):
            truth[r["id"]] = int(json.loads(r["gold"])) if r["gold"] else rng.randrange(2)
    for name, a in ids.items():
        n = 0
        while (item := store.next_item(project, a)) is not None:
            better = truth[item["id"]] if rng.random() < acc[name] else 1 - truth[item["id"]]
            order = display_order(project.seed, a, item["id"], 2)
            store.vote(project, a, item["id"], "A" if order[0] == better else "B", f"sim-{a}-{n:06d}")
            n += 1
    s = project_stats(project, store.project_data(project), threshold=0.7)
    kappas = {(c["a"], c["b"]): c["kappa"] for c in s["cohen_kappa"]}
    expected = {pair: expected_pairwise_kappa(acc[pair[0]], acc[pair[1]]) for pair in kappas}
    # Fleiss' kappa with three raters of equal (1/2, 1/2) marginals = the mean pairwise agreement's kappa;
    # Krippendorff's alpha tends to the same value for many units
    fleiss_expected = sum(expected.values()) / 3
    with capsys.disabled():
        print("\nsimulated annotators (accuracy a 0.9, b 0.8, c 0.6; 1500 pairs x 3 votes, 20% gold):")
        for pair, k in kappas.items():
            print(f"  Cohen's kappa {pair[0]}~{pair[1]}: {k:.3f} (implied {expected[pair]:.3f})")
        print(f"  Fleiss' kappa {s['fleiss_kappa']:.3f}, Krippendorff's alpha {s['krippendorff_alpha']:.3f} "
              f"(implied {fleiss_expected:.3f})")
        for r in s["annotators"]:
            print(f"  {r['name']}: gold accuracy {r['gold_accuracy']:.3f} on {r['gold_n']} (implied "
                  f"{acc[r['name']]}), majority agreement {r['majority_agreement']:.3f} (implied "
                  f"{implied_majority(acc, r['name']):.3f}), flags {r['flags']}")
    # standard error of a kappa on 1500 units is about 0.025: a tolerance of 0.07 is ~3 SE
    for pair, k in kappas.items():
        assert k == pytest.approx(expected[pair], abs=0.07)
    assert s["fleiss_kappa"] == pytest.approx(fleiss_expected, abs=0.05)
    assert s["krippendorff_alpha"] == pytest.approx(fleiss_expected, abs=0.05)
    for r in s["annotators"]:
        assert r["gold_accuracy"] == pytest.approx(acc[r["name"]], abs=0.08)  # 375 gold votes each: SE <= 0.026
    # the others' majority exists where the other two agree: right w.p. r = b*c, wrong w.p. w = (1-b)(1-c); then
    # P(a agrees) = (r*a + w*(1-a)) / (r + w): a 0.786, b 0.759, c 0.595
    for r in s["annotators"]:
        assert r["majority_agreement"] == pytest.approx(implied_majority(acc, r["name"]), abs=0.04)
    assert s["flagged"] == ["c"] and s["items_complete"] == n_items and s["fleiss_units"] == n_items
    assert math.isclose(s["progress"], 1.0)


# ---------------------------------------------------------------- the commands end to end on the tiny model
def test_sample_create_label_export_then_train_rm_and_dpo(tmp_path, capsys):
    from alignkit.models.tiny import save_tiny_models

    paths = save_tiny_models(tmp_path / "models")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in ["hi", "yes", "no", "cat"]]
                          + [{"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a chat"}]}])
    run = tmp_path / "sample"
    assert main(["sample", f"model.name_or_path={paths['policy']}", f"data.train={prompts}", "sample.k=3",
                 "generation.max_new_tokens=8", f"output_dir={run}", "seed=3"]) == 0
    cands = [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 5 and all(len(c["responses"]) == 3 and c["models"] == [str(paths["policy"])] * 3 for c in cands)
    assert cands[0]["prompt"] == "say hi" and cands[4]["prompt"][1] == {"role": "user", "content": "a chat"}
    assert json.loads((run / "summary.json").read_text())["responses"] == 15
    # a tiny random model may repeat itself: keep the records whose responses differ, as a user would
    distinct = [c for c in cands if len(set(c["responses"])) == 3]
    distinct += [{"prompt": f"extra {i}", "responses": [f"r{i}a", f"r{i}b", f"r{i}c"]} for i in range(3)]
    cand_file = write_jsonl(tmp_path / "cands.jsonl", distinct)

    db = tmp_path / "labels.db"
    assert main(["label", "create", "--db", str(db), "--project", "demo", "--candidates", str(cand_file),
                 "--overlap", "2", "--gold-rate", "0", "--annotators", "ann1,ann2"]) == 0
    out = capsys.readouterr().out
    assert "admin token" in out and "invite token for ann1" in out
    store = Store(db)
    project = store.project("demo")
    for name in ("ann1", "ann2"):
        a = store.authenticate(out.split(f"invite token for {name}: ")[1].split()[0]).annotator_id
        n = 0
        while (item := store.next_item(project, a)) is not None:
            order = display_order(project.seed, a, item["id"], 2)
            better = item["id"] % 2  # both annotators agree on every item
            store.vote(project, a, item["id"], "A" if order[0] == better else "B", f"e2e-{a}-{n:05d}")
            n += 1
    assert main(["label", "stats", "--db", str(db), "--project", "demo"]) == 0
    assert "Fleiss' kappa 1.000" in capsys.readouterr().out
    prefs = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", str(db), "--project", "demo", "--format", "pairs", "--out", str(prefs)]) == 0
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert len(records) == 3 * len(distinct) and all(r["label_prob"] == 1.0 and r["votes"]["chosen"] == 2 for r in records)
    assert main(["label", "export", "--db", str(db), "--project", "demo", "--format", "kto", "--out",
                 str(tmp_path / "k.jsonl")]) == 1
    assert "needs a binary project" in capsys.readouterr().err

    common = [f"data.train={prefs}", "train.batch_size=2", "train.max_steps=2", "train.cpu=true"]
    assert main(["rm", f"model.name_or_path={paths['reward']}", f"train.output_dir={tmp_path / 'rm'}", *common]) == 0
    assert (tmp_path / "rm" / "model").is_dir()
    assert main(["dpo", f"model.name_or_path={paths['policy']}", f"train.output_dir={tmp_path / 'dpo'}", *common]) == 0
    assert (tmp_path / "dpo" / "model").is_dir()


def test_label_commands_report_errors(tmp_path, capsys):
    db = str(tmp_path / "none.db")
    assert main(["label", "stats", "--db", db, "--project", "x"]) == 1
    assert "no such labelling database" in capsys.readouterr().err
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"]}])
    assert main(["label", "create", "--db", db, "--project", "x", "--candidates", str(path)]) == 0
    assert main(["label", "create", "--db", db, "--project", "x", "--candidates", str(path)]) == 1
    assert "a project named 'x' already exists" in capsys.readouterr().err
    assert main(["label", "invite", "--db", db, "--project", "nope", "--name", "z"]) == 1
    assert "no project named 'nope' (projects: x)" in capsys.readouterr().err
    assert main(["label", "invite", "--db", db, "--project", "x", "--name", "zoe"]) == 0
    token = capsys.readouterr().out.split("invite token for zoe: ")[1].strip()
    assert Store(db).authenticate(token).name == "zoe"
    assert main(["label", "invite", "--db", db, "--project", "x", "--name", "zoe"]) == 1
    assert "already has an annotator named 'zoe'" in capsys.readouterr().err
    assert main(["label", "stats", "--db", db, "--project", "x", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == 1 and stats["votes"] == 0 and stats["annotators"][0]["name"] == "zoe"
    assert main(["label"]) == 2
    assert main(["label", "create", "--db", db, "--project", "a b/c", "--candidates", str(path)]) == 1
    assert "project name 'a b/c': use 1-64 letters" in capsys.readouterr().err
    assert main(["sample", "model.name_or_path=tiny-random", f"output_dir={tmp_path / 's'}"]) == 1
    assert "data.train is not set" in capsys.readouterr().err


def test_create_with_an_ensemble_queues_the_most_disputed_pairs_first(tmp_path, monkeypatch, capsys):
    """`--ensemble DIR` loads `alignkit.rewards.ensemble.load_ensemble(DIR)` (a fake here, whose two members
    disagree only about the responses containing "?") and serves the pairs with the largest disagreement first."""
    import sys
    import types

    from alignkit.models.tiny import tiny_tokenizer

    class FakeEnsemble:
        tokenizer = tiny_tokenizer()  # ChatML, as the members' tokenizer would be

        def member_scores(self, prompts, completions):
            assert all(p.startswith("<|im_start|>user\n") for p in prompts)  # rendered with the chat template
            s1 = [float(len(c)) for c in completions]
            s2 = [x + (10.0 if "?" in c else 0.0) for x, c in zip(s1, completions)]
            return torch.tensor([s1, s2])  # [M=2, N]

    loaded = []
    fake = types.ModuleType("alignkit.rewards.ensemble")
    fake.load_ensemble = lambda path: loaded.append(path) or FakeEnsemble()
    monkeypatch.setitem(sys.modules, "alignkit.rewards.ensemble", fake)
    recs = [{"prompt": f"p{i}", "responses": [f"plain {i}", f"other {i}", f"what {i}?"]} for i in range(3)]
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    db = tmp_path / "l.db"
    assert main(["label", "create", "--db", str(db), "--project", "act", "--candidates", str(path), "--ensemble",
                 str(tmp_path / "ens"), "--overlap", "1", "--annotators", "a"]) == 0
    out = capsys.readouterr().out
    assert loaded == [str(tmp_path / "ens")] and "ordered by ensemble disagreement" in out
    store = Store(db)
    project = store.project("act")
    a = store.authenticate(out.split("invite token for a: ")[1].split()[0]).annotator_id
    served = []
    while (item := store.next_item(project, a)) is not None:
        served.append(item["indices"])
        store.vote(project, a, item["id"], "A", f"act-{len(served):05d}")
    # the 6 pairs with the "?" response (member margins differ by 10: std 5) come before the 3 without (std 0)
    assert all(2 in idx for idx in served[:6]) and all(2 not in idx for idx in served[6:])
