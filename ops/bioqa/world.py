"""A seeded biography world: people, six relations, biographies and question templates.

Every person has a unique name (first + last, made of invented syllables) and one value per
relation of :data:`RELATIONS`: a birth date (day month year), a birth city, a university, a
major, an employer and a work city (never the birth city, so that a swap between the two city
relations changes the answer). All vocabularies are written here for this project.

Texts are word-level (punctuation stands apart, separated by spaces) so that a whitespace
tokenizer reads them exactly:

* a *biography* states all six facts, its sentences drawn from several phrasings per relation and
  put in a seeded order (the birth date and city may share one sentence);
* a *question* follows one of 4 templates per relation, the first 2 for training and the last 2
  held out (:data:`QUESTION_TEMPLATES`); the prompt is ``Q: {question}\\nA:`` and the answer is
  the value, after a space.

``build_world(cfg)`` is deterministic in ``cfg`` (same config, same world, same texts).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from ops.errors import SaealignError

RELATIONS: tuple[str, ...] = ("birth_date", "birth_city", "university", "major", "employer", "work_city")
"""The six relations, in report order."""

RELATION_FAMILY = "relation"
"""Ontology family of the relation concepts (they are mutually exclusive: one per question)."""

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_CODAS = ("", "n", "r", "l", "s", "th", "nd", "rk", "x", "m")

CITIES: tuple[str, ...] = (
    "Arvale", "Brenmoor", "Caskrel", "Dunmere", "Elvaport", "Fennow", "Gildrath", "Harrowen",
    "Islebury", "Jorvane", "Kettlewick", "Lumbrook", "Marsettle", "Norwyn", "Orrinford", "Pellridge",
    "Quarnby", "Rosskel", "Sablemoor", "Tarnwick", "Umberlee", "Valtheim", "Wexmoor", "Yarrowdene",
    "Zephyrine", "Ashcombe", "Briarholt", "Coldmere", "Drayfield", "Emberton",
)  # fmt: skip
UNIVERSITIES: tuple[str, ...] = (
    "Northvale University", "Kestmoor University", "Almsbridge College", "Corrith Institute",
    "Saltreach University", "Oakhollow College", "Vantry Institute", "Greywater University",
    "Thistledown College", "Merrow Polytechnic", "Highcairn University", "Lowmarsh College",
    "Brightwell Institute", "Fallowmere University", "Stonecross College", "Wrenfield Polytechnic",
    "Ironvale University", "Duskmoor Institute", "Amberlyn College", "Ravensholt University",
)  # fmt: skip
MAJORS: tuple[str, ...] = (
    "Physics", "Chemistry", "Biology", "History", "Economics", "Philosophy", "Linguistics",
    "Mathematics", "Architecture", "Geology", "Astronomy", "Sociology", "Music", "Medicine", "Law",
    "Nursing", "Statistics", "Ecology", "Anthropology", "Journalism",
)  # fmt: skip
EMPLOYERS: tuple[str, ...] = (
    "Corvane Labs", "Tellurix", "Bramble Foods", "Quillmark Press", "Halden Motors", "Sunreach Energy",
    "Mirelight Studios", "Orbweave Systems", "Pinecrest Bank", "Lanternfly Games", "Copperleaf Health",
    "Driftwood Shipping", "Glassbeam Optics", "Hollowpine Timber", "Kelpworks", "Nimbus Freight",
    "Ravelstone Mining", "Silverfen Pharma", "Tidewell Water", "Vellum Robotics", "Wickerlane Retail",
    "Zentrova", "Ashgrove Insurance", "Blueheron Airlines", "Cinderpeak Steel",
)  # fmt: skip
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip

BIO_SENTENCES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {birth_date} .", "{name} came into the world on {birth_date} ."),
    "birth_city": ("{name} was born in {birth_city} .", "{name} grew up in {birth_city} , the city of birth ."),
    "university": ("{name} studied at {university} .", "{name} graduated from {university} ."),
    "major": ("{name} chose {major} as a major .", "At university {name} focused on {major} ."),
    "employer": ("{name} worked for {employer} .", "{name} was employed by {employer} ."),
    "work_city": ("{name} worked in {work_city} .", "The job of {name} was in {work_city} ."),
}
"""Phrasings of each fact in biographies (one drawn per fact and biography)."""

BIO_BIRTH_JOINT = "{name} was born on {birth_date} in {birth_city} ."
"""A biography may state both birth facts in this one sentence."""

QUESTION_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "birth_date": (
        "What is the birth date of {name} ?",
        "When was {name} born ?",
        "What was the date of birth of {name} ?",
        "On which date was {name} born ?",
    ),
    "birth_city": (
        "What is the birth city of {name} ?",
        "Where was {name} born ?",
        "What was the city of birth of {name} ?",
        "In which city was {name} born ?",
    ),
    "university": (
        "What is the university of {name} ?",
        "Where did {name} study ?",
        "What was the university of {name} ?",
        "At which university did {name} study ?",
    ),
    "major": (
        "What is the major of {name} ?",
        "What did {name} major in ?",
        "What was the major of {name} ?",
        "In which major did {name} study ?",
    ),
    "employer": (
        "What is the employer of {name} ?",
        "Who did {name} work for ?",
        "What was the employer of {name} ?",
        "For which employer did {name} work ?",
    ),
    "work_city": (
        "What is the work city of {name} ?",
        "Where did {name} work ?",
        "What was the city of work of {name} ?",
        "In which city did {name} work ?",
    ),
}
"""Four question templates per relation: indices 0-1 train, 2-3 held out. A model trained from
scratch knows no words but the world's, so every template names its relation with the words the
training texts tie to it (birth, date, city, university, major, employer, work, born, study); the
held-out ones put them in frames the training questions do not use ("What was the … of",
"In which … did"), each frame used by every relation, so that a frame alone never tells the
relation."""

TRAIN_TEMPLATES = (0, 1)
HELDOUT_TEMPLATES = (2, 3)


@dataclass(frozen=True)
class WorldConfig:
    """The biography world: how many people, how many biographies each, and its seed."""

    people: int = 1000
    """People in the world (each with a unique name and six facts)."""
    bios_per_person: int = 1
    """Biographies per person in the LM's training text (each a different phrasing and order)."""
    world_seed: int = 0
    """Seed of the world: names, facts, biography phrasings."""

    def __post_init__(self) -> None:
        if self.people < 2:
            raise SaealignError(f"--people must be at least 2, got {self.people}")
        if self.people > max_people():
            raise SaealignError(f"--people {self.people} exceeds the {max_people()} distinct names; fix: use fewer")
        if self.bios_per_person < 0:
            raise SaealignError(f"--bios-per-person must not be negative, got {self.bios_per_person}")

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(["bioqa-world-v2", asdict(self)]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]
    """Relation -> value (every relation of :data:`RELATIONS`)."""


@dataclass(frozen=True)
class Question:
    """One question about one person: its prompt ``Q: ...\\nA:``, the relation asked, the answer."""

    person: int
    relation: str
    template: int
    prompt: str
    answer: str

    @property
    def split(self) -> str:
        return "train" if self.template in TRAIN_TEMPLATES else "test"


@dataclass(frozen=True)
class World:
    config: WorldConfig
    people: tuple[Person, ...]
    bios: tuple[str, ...]
    """Training biographies (``bios_per_person`` per person, person-major order)."""

    def questions(self, split: str | None = None) -> list[Question]:
        """Every question of every person (person, relation, template order); ``split`` 'train'
        or 'test' keeps the train or held-out templates only."""
        templates = {None: (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES), "train": TRAIN_TEMPLATES, "test": HELDOUT_TEMPLATES}
        if split not in templates:
            raise SaealignError(f"unknown split '{split}'; fix: use 'train' or 'test'")
        return [
            question(self, i, rel, t) for i in range(len(self.people)) for rel in RELATIONS for t in templates[split]
        ]

    def words(self) -> list[str]:
        """Every word of the texts the LM learns from (biographies, train-template prompts, every
        answer), sorted. Words only the held-out templates use are left out: a model trained from
        scratch knows nothing of them, so its tokenizer reads them as ``<unk>``."""
        vocab: set[str] = set()
        for text in self.bios:
            vocab.update(text.split())
        for q in self.questions("train"):
            vocab.update(q.prompt.split())
        for p in self.people:
            for value in p.facts.values():
                vocab.update(value.split())
        return sorted(vocab)


def _name_parts(rng: random.Random, n: int) -> list[str]:
    parts: set[str] = set()
    while len(parts) < n:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 2)))]
        parts.add(("".join(syllables) + rng.choice(_CODAS)).capitalize())
    return sorted(parts)


_NAME_PARTS = 48


def max_people() -> int:
    return _NAME_PARTS * _NAME_PARTS


def _names(rng: random.Random, n: int) -> list[str]:
    firsts = _name_parts(random.Random(1), _NAME_PARTS)
    lasts = [p for p in _name_parts(random.Random(2), _NAME_PARTS * 2) if p not in firsts][:_NAME_PARTS]
    pairs = [f"{a}-{b}" for a in firsts for b in lasts]  # one word: one token per person
    return rng.sample(pairs, n)


def _facts(rng: random.Random) -> dict[str, str]:
    birth_city = rng.choice(CITIES)
    return {
        "birth_date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1950, 1999)}",
        "birth_city": birth_city,
        "university": rng.choice(UNIVERSITIES),
        "major": rng.choice(MAJORS),
        "employer": rng.choice(EMPLOYERS),
        "work_city": rng.choice([c for c in CITIES if c != birth_city]),
    }


def _bio(rng: random.Random, person: Person) -> str:
    values = {"name": person.name, **person.facts}
    sentences = [rng.choice(BIO_SENTENCES[rel]).format(**values) for rel in RELATIONS]
    if rng.random() < 0.3:  # both birth facts in one sentence
        sentences = [BIO_BIRTH_JOINT.format(**values), *sentences[2:]]
    first, rest = sentences[:1], sentences[1:]
    rng.shuffle(rest)
    return " ".join(first + rest)


def build_world(cfg: WorldConfig) -> World:
    """The world of ``cfg`` (deterministic in it)."""
    rng = random.Random(cfg.world_seed)
    people = tuple(Person(name, _facts(rng)) for name in _names(rng, cfg.people))
    bios = tuple(_bio(rng, p) for p in people for _ in range(cfg.bios_per_person))
    return World(cfg, people, bios)


def prompt_of(question_text: str) -> str:
    """The QA prompt format: ``Q: {question}\\nA:`` (the answer follows after a space)."""
    return f"Q: {question_text}\nA:"


def question(world: World, person: int, relation: str, template: int) -> Question:
    if relation not in QUESTION_TEMPLATES:
        raise SaealignError(f"unknown relation '{relation}'; fix: use one of {', '.join(RELATIONS)}")
    p = world.people[person]
    text = QUESTION_TEMPLATES[relation][template].format(name=p.name)
    return Question(person, relation, template, prompt_of(text), p.facts[relation])


def answer_text_of(q: Question) -> str:
    """A question with its answer, as the LM reads it in training (``Q: ...\nA: value``)."""
    return f"{q.prompt} {q.answer}"


def concept_of(relation: str) -> str:
    """The ontology concept label of a relation (``relation:birth_city``)."""
    return f"{RELATION_FAMILY}:{relation}"


def ontology_rows(world: World, per_split: int | None = None, seed: int = 0) -> Iterator[dict[str, object]]:
    """The AlignSAE ontology of the world: one row per question prompt, labelled by the relation
    asked, with its split (train templates -> 'train', held-out templates -> 'test') and the
    person's answers keyed by concept (what a swap toward each relation should answer).
    ``per_split``: keep that many people's questions per split (seeded choice; None = all)."""
    rng = random.Random(seed)
    people = list(range(len(world.people)))
    chosen = {
        split: sorted(rng.sample(people, per_split)) if per_split and per_split < len(people) else people
        for split in ("train", "test")
    }
    for split, templates in (("train", TRAIN_TEMPLATES), ("test", HELDOUT_TEMPLATES)):
        for i in chosen[split]:
            answers = {concept_of(r): v for r, v in world.people[i].facts.items()}
            for rel in RELATIONS:
                for t in templates:
                    q = question(world, i, rel, t)
                    yield {
                        "text": q.prompt,
                        "label": concept_of(rel),
                        "family": RELATION_FAMILY,
                        "split": split,
                        "answers": answers,
                    }
