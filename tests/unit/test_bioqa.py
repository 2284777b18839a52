"""The biography world, its tokenizer, the bio-QA ontology and the exact-answer swap judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ops.alignsae.metrics import binding_accuracy
from ops.alignsae.ontology import load_ontology, split_ontology
from ops.alignsae.swaps import AnswerJudge, SwapTrial, answer_of, plan_swaps
from ops.bioqa.lm import LMConfig, _word_dropout, build_tokenizer, fingerprint, training_examples
from ops.bioqa.world import (
    HELDOUT_TEMPLATES,
    QUESTION_TEMPLATES,
    RELATIONS,
    TRAIN_TEMPLATES,
    WorldConfig,
    build_world,
    concept_of,
    ontology_rows,
)
from ops.errors import SaealignError


def test_the_world_is_deterministic_in_its_config() -> None:
    a, b = build_world(WorldConfig(people=50, world_seed=3)), build_world(WorldConfig(people=50, world_seed=3))
    assert a.people == b.people and a.bios == b.bios
    c = build_world(WorldConfig(people=50, world_seed=4))
    assert [p.facts for p in c.people] != [p.facts for p in a.people]
    assert WorldConfig(people=50).fingerprint() != WorldConfig(people=51).fingerprint()


def test_every_person_has_a_unique_name_and_one_value_per_relation() -> None:
    world = build_world(WorldConfig(people=1000))
    names = [p.name for p in world.people]
    assert len(set(names)) == 1000
    for person in world.people:
        assert set(person.facts) == set(RELATIONS)
        assert person.facts["work_city"] != person.facts["birth_city"]
        assert all(v.strip() for v in person.facts.values())
    day, month, year = world.people[0].facts["birth_date"].split()
    assert 1 <= int(day) <= 28 and 1950 <= int(year) <= 1999 and month.isalpha()


def test_biographies_state_all_six_facts() -> None:
    world = build_world(WorldConfig(people=20, bios_per_person=3))
    assert len(world.bios) == 60
    for i, bio in enumerate(world.bios):
        person = world.people[i // 3]
        assert person.name in bio
        assert all(value in bio for value in person.facts.values())
    assert len(set(world.bios[:3])) > 1  # phrasings and order vary


def test_four_templates_per_relation_split_two_and_two() -> None:
    assert set(QUESTION_TEMPLATES) == set(RELATIONS)
    assert all(len(t) == 4 and len(set(t)) == 4 for t in QUESTION_TEMPLATES.values())
    assert set(TRAIN_TEMPLATES).isdisjoint(HELDOUT_TEMPLATES) and len(TRAIN_TEMPLATES) == len(HELDOUT_TEMPLATES) == 2
    world = build_world(WorldConfig(people=10))
    train, test = world.questions("train"), world.questions("test")
    assert len(train) == len(test) == 10 * 6 * 2
    assert {q.prompt for q in train}.isdisjoint({q.prompt for q in test})
    q = test[0]
    assert q.prompt.startswith("Q: ") and q.prompt.endswith("\nA:")
    assert q.answer == world.people[q.person].facts[q.relation]
    with pytest.raises(SaealignError, match="split"):
        world.questions("dev")


def test_world_config_refuses_bad_sizes() -> None:
    with pytest.raises(SaealignError, match="people"):
        WorldConfig(people=1)
    with pytest.raises(SaealignError, match="distinct names"):
        WorldConfig(people=10**7)


def test_word_tokenizer_round_trips_every_answer() -> None:
    world = build_world(WorldConfig(people=30))
    tok = build_tokenizer(world.words())
    for q in world.questions("train"):
        ids = tok(q.prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    # a word only the held-out templates use was never trained on: the tokenizer reads it as unknown
    unseen = [q.prompt for q in world.questions("test") if "which" in q.prompt.split()]
    assert unseen and tok.unk_token_id in tok(unseen[0])["input_ids"]
    for person in world.people:
        for value in person.facts.values():
            assert tok.decode(tok(value, add_special_tokens=False)["input_ids"]) == value


def test_word_dropout_keeps_the_name_and_the_answer_and_drops_the_rest_both_ways() -> None:
    import random

    world = build_world(WorldConfig(people=20))
    tok = build_tokenizer(world.words())
    _, qa = training_examples(world, tok)
    questions = world.questions("train")
    rng = random.Random(0)
    unk, left_out, changed = tok.unk_token_id, 0, 0
    for q, e in zip(questions, qa, strict=True):
        assert e.maskable and all(0 < pos < e.loss_from for pos in e.maskable)
        assert _word_dropout(e, 0.0, unk, rng) == e
        d = _word_dropout(e, 0.5, unk, rng)
        answer = e.ids[e.loss_from :]
        assert d.ids[d.loss_from :] == answer  # the answer (and EOS), still the only loss positions
        assert tok(world.people[q.person].name, add_special_tokens=False)["input_ids"][0] in d.ids[: d.loss_from]
        assert d.ids[:2] == e.ids[:2] and d.ids[d.loss_from - 2 : d.loss_from] == e.ids[e.loss_from - 2 : e.loss_from]
        left_out += len(e.ids) - len(d.ids)
        changed += d.ids != e.ids
    assert left_out > 0 and changed > len(qa) // 2
    assert any(unk in _word_dropout(e, 0.5, unk, rng).ids for e in qa)
    with pytest.raises(SaealignError, match="word-dropout"):
        LMConfig(lm_word_dropout=1.0)


def test_lm_fingerprint_follows_world_and_training_but_not_evaluation_size() -> None:
    w = WorldConfig(people=30)
    assert fingerprint(w, LMConfig()) == fingerprint(w, LMConfig(lm_eval_questions=10))
    assert fingerprint(w, LMConfig()) != fingerprint(w, LMConfig(lm_epochs=3))
    assert fingerprint(w, LMConfig()) != fingerprint(WorldConfig(people=31), LMConfig())
    with pytest.raises(SaealignError, match="multiple"):
        LMConfig(lm_width=30, lm_heads=4)


def test_ontology_rows_split_by_template_with_the_persons_answers(tmp_path: Path) -> None:
    world = build_world(WorldConfig(people=12))
    path = tmp_path / "onto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ontology_rows(world, per_split=5, seed=0)))
    ontology = load_ontology(str(path), min_texts=2)
    train, test = split_ontology(ontology, seed=0)
    assert len(train.texts) == len(test.texts) == 5 * 6 * 2
    train_prompts = {q.prompt for q in world.questions("train")}
    assert set(train.texts) <= train_prompts and set(test.texts).isdisjoint(train_prompts)
    assert test.answers is not None and train.answers is not None
    for text, label, answers in zip(test.texts, test.labels, test.answers, strict=True):
        person = next(p for p in world.people if p.name in text)
        assert answers == {concept_of(r): v for r, v in person.facts.items()}
        assert label == concept_of(next(r for r in RELATIONS if text in {q.prompt for q in _questions(world, r)}))


def _questions(world: object, relation: str) -> list[object]:
    return [q for q in world.questions() if q.relation == relation]  # type: ignore[attr-defined]


def test_a_bad_split_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "onto.jsonl"
    rows = [{"text": f"t{i}", "label": f"c{i % 2}", "split": "dev"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SaealignError, match="split value"):
        load_ontology(str(path), min_texts=2)


def test_answer_judge_names_the_concept_whose_answer_was_given() -> None:
    answers = {"r:a": "Arvale", "r:b": "14 May 1990", "r:c": "Physics"}
    trials = [SwapTrial("Q: x\nA:", "r:a", "r:b", ("r:a", "r:b", "r:c"), answers)] * 4
    said = [" 14 May 1990", "Arvale\nQ: more", "Chemistry", ""]
    assert AnswerJudge().judge(said, trials) == ["r:b", "r:a", "", ""]
    assert answer_of(" 14  May 1990 \n next") == "14 May 1990"
    with pytest.raises(SaealignError, match="answers"):
        AnswerJudge().judge(["x"], [SwapTrial("p", "r:a", "r:b", ("r:a", "r:b"))])


def test_all_target_swaps_cover_every_other_concept_of_each_prompt() -> None:
    texts = [f"q{i}" for i in range(12)]
    labels = [f"r:{'abc'[i % 3]}" for i in range(12)]
    families = {"r:a": "r", "r:b": "r", "r:c": "r"}
    trials = plan_swaps(texts, labels, families, per_family=3, seed=0, all_targets=True)
    assert len(trials) == 3 * 2
    assert {(t.source, t.target) for t in trials} == {(s, t) for s in families for t in families if s != t}
    assert all(t.source != t.target for t in trials)


def test_binding_accuracy_is_the_share_of_texts_whose_own_slot_wins_in_its_family() -> None:
    acts = np.array([[2.0, 1.0, 0.0], [0.5, 1.0, 9.0], [3.0, 0.0, 1.0]])
    labels = np.eye(3, dtype=bool)[[0, 1, 2]]
    assert binding_accuracy(acts, labels, ["f", "f", "f"]) == pytest.approx(1 / 3)
    # slot 2 alone in its family: texts 0 and 1 are judged among slots 0-1 only (and win there)
    assert binding_accuracy(acts, labels, ["f", "f", "g"]) == pytest.approx(1.0)
