"""A small causal LM trained from scratch on a biography world (docs/algorithms.md §6).

* **Tokenizer**: word level (the world's texts are whitespace-separated words), with ``<pad>``,
  ``<bos>``, ``<eos>`` and ``<unk>``; BOS is put in front of every text by the tokenizer itself,
  so :func:`ops.models.lm.load_model` prepends it too. Saved with ``save_pretrained`` as a
  ``PreTrainedTokenizerFast``.
* **Model**: a standard Hugging Face GPT-2 config (``lm_width``, ``lm_layers``, ``lm_heads``),
  so the directory loads with ``load_model(dir)`` and converts to its TransformerLens twin.
* **Training data**: every biography (loss on every token) and every person's questions in the
  *train* templates, ``Q: {question}\\nA: {answer}<eos>`` (loss on the answer and EOS only).
  The held-out templates are never trained on.
* **Word dropout** (``lm_word_dropout``): in every pass each question word but the name is, with
  that chance, left out or read as ``<unk>``. Without it the model keys on the train phrasings
  and on where their words stand, and answers held-out phrasings with another relation's value
  of the same person; the held-out templates' words the LM never saw read as ``<unk>`` too.
* **Training**: AdamW, linear warm-up then cosine decay, batches of one kind (biographies or
  questions) so that little is padding, ``lm_epochs`` passes.
* **Evaluation**: greedy answers (the project's decode loop) of train-template and held-out
  questions, exact match of the text before EOS with the person's value.
* **Cache**: the result is a directory keyed by the fingerprint of (world config, LM config);
  :func:`train_or_load` reuses a completed one, so a second run trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ops.bioqa.world import World, WorldConfig, build_world
from ops.errors import SaealignError
from ops.manifest import write_json_atomic
from ops.paths import cache_dir

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TRAINING_FILE = "bioqa_lm.json"
FORMAT = "saealign-bioqa-lm-v2"


@dataclass(frozen=True)
class LMConfig:
    """The biography-QA language model: its GPT-2 shape and how it is trained."""

    lm_width: int = 128
    """d_model of the GPT-2 config (heads of lm_width / lm_heads dims)."""
    lm_layers: int = 3
    """Transformer blocks."""
    lm_heads: int = 4
    """Attention heads per block."""
    lm_epochs: float = 80.0
    """Passes over the training text (biographies + train-template questions)."""
    lm_batch_tokens: int = 2048
    """Tokens (padding included) per optimiser step."""
    lm_lr: float = 3e-3
    """AdamW peak learning rate (3 % warm-up, cosine decay to a tenth)."""
    lm_weight_decay: float = 0.01
    """AdamW weight decay."""
    lm_word_dropout: float = 0.3
    """Chance that each word of a training question other than the person's name is dropped in a
    pass (drawn anew every pass; half the dropped words left out, half read as ``<unk>``): the
    answer must follow from the words left wherever they stand, so neither a whole phrasing nor
    a word's position is learnt as the cue (0: questions are read as written)."""
    lm_seed: int = 0
    """Seed of the initialisation, the batch order and the word dropout."""
    lm_eval_questions: int = 1200
    """Questions per split (train templates, held-out templates) in the exact-match evaluation."""

    def __post_init__(self) -> None:
        if min(self.lm_width, self.lm_layers, self.lm_heads, self.lm_batch_tokens) <= 0 or self.lm_epochs <= 0:
            raise SaealignError(
                "--lm-width, --lm-layers, --lm-heads, --lm-batch-tokens and --lm-epochs must be positive"
            )
        if not 0.0 <= self.lm_word_dropout < 1.0:
            raise SaealignError(f"--lm-word-dropout must be in [0, 1), got {self.lm_word_dropout}")
        if self.lm_width % self.lm_heads:
            raise SaealignError(f"--lm-width {self.lm_width} is not a multiple of --lm-heads {self.lm_heads}")


def fingerprint(world: WorldConfig, lm: LMConfig) -> str:
    """Identifies one trained LM: the world it learnt and how (evaluation size excluded)."""
    train = {k: v for k, v in asdict(lm).items() if k != "lm_eval_questions"}
    return hashlib.sha1(json.dumps([FORMAT, world.fingerprint(), train]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Tokenizer and model


def build_tokenizer(words: Sequence[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (BOS added in front of each text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *(w for w in words if w not in SPECIAL_TOKENS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(cfg: LMConfig, tokenizer: Any, n_positions: int) -> Any:
    """A randomly initialised GPT-2 of ``cfg`` for ``tokenizer``'s vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=cfg.lm_width,
        n_layer=cfg.lm_layers,
        n_head=cfg.lm_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.lm_seed)
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------------------------------------
# Training examples


@dataclass
class _Example:
    ids: list[int]
    loss_from: int
    """Positions before this one are context only (no loss on predicting them)."""
    maskable: tuple[int, ...] = ()
    """Positions the word dropout may replace by ``<unk>`` (a question's words but the name)."""


def training_examples(world: World, tokenizer: Any) -> tuple[list[_Example], list[_Example]]:
    """(biographies, train-template questions) as token ids with BOS, ending in EOS."""
    eos = tokenizer.eos_token_id
    bios = [_Example([*ids, eos], 1) for ids in tokenizer(list(world.bios))["input_ids"]]
    questions = world.questions("train")
    prompts = tokenizer([q.prompt for q in questions])["input_ids"]
    answers = tokenizer([q.answer for q in questions], add_special_tokens=False)["input_ids"]
    names = tokenizer([world.people[q.person].name for q in questions], add_special_tokens=False)["input_ids"]
    frame = set(tokenizer.convert_tokens_to_ids([tokenizer.bos_token, "Q:", "A:", "?"]))
    qa = [
        _Example([*p, *a, eos], len(p), tuple(i for i, t in enumerate(p) if t not in frame and t not in name))
        for p, a, name in zip(prompts, answers, names, strict=True)
    ]
    return bios, qa


def _batches(examples: list[_Example], batch_tokens: int, rng: random.Random) -> list[list[_Example]]:
    order = examples[:]
    rng.shuffle(order)
    width = max(len(e.ids) for e in examples)
    size = max(1, batch_tokens // width)
    return [order[i : i + size] for i in range(0, len(order), size)]


def _word_dropout(e: _Example, chance: float, unk: int, rng: random.Random) -> _Example:
    """``e`` with each maskable word dropped with probability ``chance``: half the dropped words
    are left out (the words after them move up a position) and half read as ``<unk>``."""
    dropped = [pos for pos in e.maskable if rng.random() < chance]
    if not dropped:
        return e
    unknown = {pos for pos in dropped if rng.random() < 0.5}
    ids = [unk if i in unknown else t for i, t in enumerate(e.ids) if i in unknown or i not in dropped]
    return _Example(ids, e.loss_from - (len(dropped) - len(unknown)))


def _tensors(batch: list[_Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) of ``batch``, right-padded."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        labels[i, e.loss_from : len(e.ids)] = torch.tensor(e.ids[e.loss_from :])
    return ids, mask, labels


def train_lm(model: Any, examples: Sequence[list[_Example]], cfg: LMConfig, pad: int, unk: int) -> list[float]:
    """Train ``model`` in place on the example groups for ``cfg.lm_epochs``; returns the loss per step."""
    rng = random.Random(cfg.lm_seed)
    drop_rng = random.Random(cfg.lm_seed + 1)
    groups = [g for g in examples if g]
    per_epoch = sum(len(_batches(g, cfg.lm_batch_tokens, random.Random(0))) for g in groups)
    total = max(1, math.ceil(per_epoch * cfg.lm_epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=cfg.lm_weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(0.03 * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    with tqdm(total=total, desc="bio-QA LM", unit="step") as bar:
        while len(losses) < total:
            epoch = [b for g in groups for b in _batches(g, cfg.lm_batch_tokens, rng)]
            rng.shuffle(epoch)
            for batch in epoch[: total - len(losses)]:
                if cfg.lm_word_dropout > 0:
                    batch = [_word_dropout(e, cfg.lm_word_dropout, unk, drop_rng) for e in batch]
                ids, mask, labels = _tensors(batch, pad)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                if len(losses) % 50 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Evaluation


def answer_text(text: str) -> str:
    """The answer in a greedy continuation: its first line, spaces normalised."""
    return " ".join(text.strip().split("\n", 1)[0].split())


def answer_questions(model: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy answers of a :class:`ops.models.lm.LanguageModel` to ``prompts`` (decoded to EOS)."""
    from ops.alignsae.swaps import generate_ids

    ids = model.tokenize(list(prompts))
    out: list[str] = []
    for start in range(0, len(ids), batch_size):
        new = generate_ids(model, ids[start : start + batch_size], max_new_tokens, seed=None)
        out += [answer_text(str(model.tokenizer.decode(row, skip_special_tokens=True))) for row in new]
    return out


def exact_match(model: Any, world: World, split: str, n: int, seed: int = 0) -> dict[str, Any]:
    """Exact match of greedy answers on ``n`` seeded questions of ``split`` ('train' templates or
    held-out 'test' templates), overall, per relation and per template ('relation/index')."""
    questions = world.questions(split)
    if n and n < len(questions):
        questions = random.Random(seed).sample(questions, n)
    longest = max(len(q.answer.split()) for q in questions) + 1
    answers = answer_questions(model, [q.prompt for q in questions], longest)
    hits = [a == q.answer for a, q in zip(answers, questions, strict=True)]
    by_relation: dict[str, list[bool]] = {}
    by_template: dict[str, list[bool]] = {}
    for q, hit in zip(questions, hits, strict=True):
        by_relation.setdefault(q.relation, []).append(hit)
        by_template.setdefault(f"{q.relation}/{q.template}", []).append(hit)
    return {
        "exact_match": sum(hits) / len(hits),
        "n": len(hits),
        "by_relation": {r: sum(v) / len(v) for r, v in by_relation.items()},
        "by_template": {t: sum(v) / len(v) for t, v in sorted(by_template.items())},
    }


# ---------------------------------------------------------------------------------------------
# The cached job step


def lm_dir(root: Path, world: WorldConfig, lm: LMConfig) -> Path:
    return root / f"lm-{fingerprint(world, lm)}"


def default_cache_root() -> Path:
    return cache_dir() / "bioqa"


def read_training_record(path: Path) -> dict[str, Any] | None:
    """The record of a completed training in ``path`` (None when absent or incomplete)."""
    record = path / TRAINING_FILE
    if not (record.is_file() and (path / "config.json").is_file()):
        return None
    data: dict[str, Any] = json.loads(record.read_text())
    return data if data.get("format") == FORMAT else None


def train_or_load(world_cfg: WorldConfig, cfg: LMConfig, root: Path) -> tuple[Path, dict[str, Any], bool]:
    """The trained LM directory of (world, LM config) under ``root``: reused when a completed one
    is there, else trained, evaluated and written atomically. Returns (directory, its training
    record, whether it was reused)."""
    from ops.models.lm import load_model

    target = lm_dir(root, world_cfg, cfg)
    record = read_training_record(target)
    if record is not None:
        log.info("bio-QA LM reused from %s", target)
        return target, record, True
    t0 = time.perf_counter()
    world = build_world(world_cfg)
    tokenizer = build_tokenizer(world.words())
    bios, qa = training_examples(world, tokenizer)
    longest = max(len(e.ids) for e in (*bios, *qa)) + 8
    model = build_model(cfg, tokenizer, n_positions=1 << max(5, math.ceil(math.log2(longest))))
    losses = train_lm(model, [bios, qa], cfg, tokenizer.pad_token_id, tokenizer.unk_token_id)
    train_s = time.perf_counter() - t0
    tmp = target.with_name(f"{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    t1 = time.perf_counter()
    lm = load_model(str(tmp))
    metrics = {split: exact_match(lm, world, split, cfg.lm_eval_questions) for split in ("train", "test")}
    record = {
        "format": FORMAT,
        "fingerprint": fingerprint(world_cfg, cfg),
        "world": asdict(world_cfg),
        "lm": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "examples": {"bios": len(bios), "questions": len(qa)},
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": sum(losses[-50:]) / len(losses[-50:]),
        "exact_match": metrics,
        "timings": {"train_s": train_s, "eval_s": time.perf_counter() - t1},
    }
    write_json_atomic(tmp / TRAINING_FILE, record)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info(
        "bio-QA LM trained in %.0fs: exact match train %.3f, held-out %.3f",
        train_s,
        metrics["train"]["exact_match"],
        metrics["test"]["exact_match"],
    )
    return target, record, False
