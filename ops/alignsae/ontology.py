"""Concept ontologies for AlignSAE: labelled texts, validation and a fixed train/test split.

Two input forms:

* JSONL (or any source :func:`ops.texts.read_texts` reads, ``embedded:ontology`` included) with
  a ``text`` and a ``label`` column and optional columns: ``family``; ``split`` (``train`` or
  ``test``: a fixed split, used instead of the seeded one, e.g. train vs held-out question
  templates); ``answers`` (a JSON object concept -> the answer a swap toward that concept should
  produce, for the exact-match swap judge, e.g. the person's value of each relation);
* YAML: a mapping ``concept -> list of texts`` (or ``concept -> {family: ..., texts: [...]}``).

A *family* groups mutually exclusive concepts (``sentiment:positive`` / ``sentiment:negative``).
When no family is given it is read from the label's prefix before ``:``
(``news_topic:Sports`` -> ``news_topic``); a label without a prefix is its own family.

The split is stratified per concept and deterministic in ``seed``: the same file and seed always
give the same train and test texts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ops.errors import SaealignError
from ops.texts import read_texts

log = logging.getLogger(__name__)

MIN_TEXTS_PER_CONCEPT = 10


@dataclass(frozen=True)
class Ontology:
    """Labelled texts: ``texts[i]`` belongs to concept ``labels[i]``; ``families`` maps each
    concept to its family (concepts of one family are mutually exclusive)."""

    source: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    families: dict[str, str]
    splits: tuple[str, ...] | None = None
    """Per text, 'train' or 'test' when the ontology fixes its own split."""
    answers: tuple[dict[str, str], ...] | None = None
    """Per text, concept -> expected answer (the exact-match swap judge)."""

    @property
    def concepts(self) -> list[str]:
        """Concepts in first-appearance order."""
        return list(dict.fromkeys(self.labels))

    def family_members(self, concept: str) -> list[str]:
        """Concepts of ``concept``'s family (``concept`` included), in ontology order."""
        fam = self.families[concept]
        return [c for c in self.concepts if self.families[c] == fam]

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(c) for c in self.concepts}

    def label_matrix(self, concepts: Sequence[str] | None = None) -> np.ndarray:
        """Bool [n_texts, n_concepts]: True where text i has concept j (columns in the order of
        ``concepts``, default this ontology's)."""
        index = {c: j for j, c in enumerate(self.concepts if concepts is None else concepts)}
        out = np.zeros((len(self.texts), len(index)), dtype=bool)
        out[np.arange(len(self.texts)), [index[lab] for lab in self.labels]] = True
        return out

    def subset(self, rows: Sequence[int]) -> Ontology:
        return Ontology(
            source=self.source,
            texts=tuple(self.texts[i] for i in rows),
            labels=tuple(self.labels[i] for i in rows),
            families=dict(self.families),
            splits=None if self.splits is None else tuple(self.splits[i] for i in rows),
            answers=None if self.answers is None else tuple(self.answers[i] for i in rows),
        )

    def select(self, concepts: Sequence[str]) -> Ontology:
        """Keep only the texts of ``concepts`` (unknown names are an error)."""
        check_concepts(self, concepts)
        keep = set(concepts)
        rows = [i for i, lab in enumerate(self.labels) if lab in keep]
        sub = self.subset(rows)
        families = {c: f for c, f in self.families.items() if c in keep}
        return Ontology(sub.source, sub.texts, sub.labels, families, sub.splits, sub.answers)


def default_family(label: str) -> str:
    """Family of a label without an explicit one: the prefix before ':' (or the label itself)."""
    prefix, sep, _ = label.partition(":")
    return prefix if sep and prefix else label


def check_concepts(ontology: Ontology, names: Sequence[str]) -> None:
    """Raise unless every name is a concept of ``ontology``."""
    unknown = [n for n in names if n not in ontology.families]
    if unknown:
        raise SaealignError(
            f"unknown concept(s) {', '.join(unknown)}; fix: use concepts of the ontology "
            f"({', '.join(ontology.concepts)})"
        )


def _families(labels: Sequence[str], given: Sequence[str | None]) -> dict[str, str]:
    families: dict[str, str] = {}
    for label, fam in zip(labels, given, strict=True):
        fam = fam or default_family(label)
        if families.setdefault(label, fam) != fam:
            raise SaealignError(
                f"concept '{label}' is listed in two families ('{families[label]}' and '{fam}'); "
                "fix: give every text of a concept the same family"
            )
    return families


def _read_yaml(path: Path) -> tuple[list[str], list[str], list[str | None]]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SaealignError(f"'{path}' must map concept -> list of texts; fix: write e.g. 'sentiment:positive: [...]'")
    texts: list[str] = []
    labels: list[str] = []
    fams: list[str | None] = []
    for concept, body in data.items():
        family = body.get("family") if isinstance(body, dict) else None
        items = body.get("texts", []) if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise SaealignError(f"concept '{concept}' in '{path}' has no list of texts; fix: give it a YAML list")
        for item in items:
            texts.append(str(item))
            labels.append(str(concept))
            fams.append(None if family is None else str(family))
    return texts, labels, fams


def _extra_columns(spec: str, table: Any) -> tuple[list[str] | None, list[dict[str, str]] | None]:
    """The optional ``split`` and ``answers`` columns of an ontology table, checked."""
    splits = answers = None
    if "split" in table.column_names:
        splits = [str(x) for x in table.column("split").to_pylist()]
        bad = sorted(set(splits) - {"train", "test"})
        if bad:
            raise SaealignError(f"ontology '{spec}' has split value(s) {bad}; fix: use 'train' or 'test'")
    if "answers" in table.column_names:
        answers = []
        for x in table.column("answers").to_pylist():
            value = json.loads(x) if isinstance(x, str) else x
            if not isinstance(value, dict):
                raise SaealignError(
                    f"ontology '{spec}': an 'answers' cell is not an object; fix: map concept -> answer"
                )
            answers.append({str(k): str(v) for k, v in value.items() if v is not None})
    return splits, answers


def _read_table(spec: str) -> tuple[list[str], list[str], list[str | None]]:
    table = read_texts(spec).table
    if "label" not in table.column_names:
        raise SaealignError(f"ontology '{spec}' has no 'label' column; fix: give every text a concept label")
    labels = [str(x) if x is not None else "" for x in table.column("label").to_pylist()]
    texts = [str(x) if x is not None else "" for x in table.column("text").to_pylist()]
    fams: list[str | None] = (
        [None if x is None else str(x) for x in table.column("family").to_pylist()]
        if "family" in table.column_names
        else [None] * len(texts)
    )
    return texts, labels, fams


def load_ontology(spec: str, min_texts: int = MIN_TEXTS_PER_CONCEPT) -> Ontology:
    """Read an ontology (JSONL/CSV/Parquet with text+label, ``embedded:ontology``, or YAML) and
    validate it: non-empty texts, at least two concepts and ``min_texts`` texts per concept."""
    is_yaml = spec.lower().endswith((".yaml", ".yml"))
    if is_yaml and not Path(spec).expanduser().is_file():
        raise SaealignError(f"ontology '{spec}' does not exist; fix: pass an existing YAML or JSONL file")
    texts, labels, fams = _read_yaml(Path(spec).expanduser()) if is_yaml else _read_table(spec)
    splits, answers = (None, None) if is_yaml else _extra_columns(spec, read_texts(spec).table)
    rows = [i for i, (t, lab) in enumerate(zip(texts, labels, strict=True)) if t.strip() and lab.strip()]
    texts, labels, fams = [texts[i] for i in rows], [labels[i] for i in rows], [fams[i] for i in rows]
    ontology = Ontology(
        spec,
        tuple(texts),
        tuple(labels),
        _families(labels, fams),
        None if splits is None else tuple(splits[i] for i in rows),
        None if answers is None else tuple(answers[i] for i in rows),
    )
    validate(ontology, min_texts)
    log.info("ontology %s: %d texts, %s", spec, len(texts), ontology.counts())
    return ontology


def validate(ontology: Ontology, min_texts: int = MIN_TEXTS_PER_CONCEPT) -> None:
    """Raise on an ontology AlignSAE cannot learn from."""
    counts = ontology.counts()
    if len(counts) < 2:
        raise SaealignError(
            f"ontology '{ontology.source}' has {len(counts)} concept(s); fix: give at least two labelled concepts"
        )
    small = {c: n for c, n in counts.items() if n < min_texts}
    if small:
        listed = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise SaealignError(
            f"concept(s) with fewer than {min_texts} texts: {listed}; fix: add texts or drop those concepts"
        )


def _stable_key(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}\x00{text}".encode()).digest()[:8], "little")


def split_ontology(ontology: Ontology, test_fraction: float = 0.25, seed: int = 0) -> tuple[Ontology, Ontology]:
    """Stratified train/test split: per concept, texts ordered by a seeded hash of their text and
    the first ``round(test_fraction * n)`` (at least 2) go to test. Independent of file order.
    An ontology with its own ``split`` column is split by it instead (``test_fraction`` unused)."""
    if ontology.splits is not None:
        train_rows = [i for i, s in enumerate(ontology.splits) if s == "train"]
        test_rows = [i for i, s in enumerate(ontology.splits) if s == "test"]
        if not train_rows or not test_rows:
            raise SaealignError(
                f"ontology '{ontology.source}' splits into {len(train_rows)} train and {len(test_rows)} "
                "test texts; fix: give both splits texts"
            )
        return ontology.subset(train_rows), ontology.subset(test_rows)
    if not 0.0 < test_fraction < 1.0:
        raise SaealignError(f"test fraction must be in (0, 1), got {test_fraction}")
    train: list[int] = []
    test: list[int] = []
    for concept in ontology.concepts:
        rows = [i for i, lab in enumerate(ontology.labels) if lab == concept]
        rows.sort(key=lambda i: (_stable_key(seed, ontology.texts[i]), i))
        n_test = min(len(rows) - 2, max(2, round(test_fraction * len(rows))))
        test += rows[:n_test]
        train += rows[n_test:]
    return ontology.subset(sorted(train)), ontology.subset(sorted(test))
