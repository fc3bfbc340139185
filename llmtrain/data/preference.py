"""Preference data (DPO and kin): records -> chosen/rejected conversations -> masked ids, packed, cached.

    cache = build_preference_cache(cfg.data, tokenizer, template, seq_len, seed=0, root=Path("runs/x/dpo-cache"))
    split = PreferenceSplit.open(cache, "train")          # memory-mapped
    batches = PreferenceBatches(split, seq_len, pad_id=read_meta(cache)["pad_id"], micro_batch_size=2,
                                grad_accum=4, rank=0, world_size=2, seed=0)   # read_meta: llmtrain.data.sft
    for mb in batches.next_step(): ...   # + seq_ids / chosen_index / rejected_index / pair_ids / response_lengths

Records (JSONL/JSON/Parquet, read by llmtrain/data/sft.py's `data_files` / `read_records`), field
names from `data.*`:
- prompt form: `{"prompt": str, "chosen": ..., "rejected": ...}`; the prompt becomes a user turn
  (`data.template` may build it from the record's fields, and `data.system_prompt` adds a
  system turn before it, as for SFT pairs); a `prompt` that is a list of messages is used as is;
- chat form: `{"messages": [{"role", "content"}, ...], "chosen": ..., "rejected": ...}`: the
  shared turns (no system prompt is added, as for SFT chat).
`chosen` / `rejected` are each a string (one assistant turn), one {role, content} message, or a
list of messages (containing at least one assistant turn). Each side is rendered as a whole
conversation (shared turns + that side) with the SFT chat templates (llmtrain/data/chat.py); its
supervised tokens are the side's own assistant tokens including the end-of-turn token; the
shared turns, assistant turns among them included, are unsupervised prompt. A side's "prompt"
below is everything before its first supervised token, its "response" everything from there on.

A pair's two sequences go in the SAME packed row (chosen, then rejected), so the pair must fit
`seq_len` together. `data.pair_truncation` for pairs that do not:
- `prompt_first` (default): cut both prompts from the left (keeping their end: the latest turn
  and the assistant header) until the pair fits, but not below seq_len // 4 tokens per side
  (TRL's old default kept prompts to half of each sequence, max_prompt_length 512 of max_length
  1024; a row holds two sequences); if that is not enough, cut both responses from the right
  to the longest common length that fits. Each response then keeps >= seq_len // 4 tokens, the
  first of them supervised, so no response is emptied by this rule (the `no_response` count
  below guards the case anyway). Counted as `truncated.prompt` / `truncated.response` (pairs).
- `drop`: such pairs are dropped (`dropped.too_long`); `error`: stop, with their count.
Pairs whose chosen and rejected token ids are equal teach nothing: dropped and counted
(`dropped.identical`, and `dropped.identical_after_truncation` when the cut made them equal). A
split with no pair left is a UserError, as is a record without a field (naming the file, the
1-based record number and the field).

Split, subset and cache as for SFT: `data.val_path`, or `data.val_fraction` of the records held
out with the seed (at most `data.max_val_examples`); `data.max_examples` caps training pairs.
ROOT/<key>/ with the key SFT's cache key (data bytes, tokenizer, template, every data setting,
seq_len, seed) under a "preference" namespace, written complete-or-absent and reused when the
key matches. Per split: `tokens.npy` (int32), `mask.npy` (uint8, 1 = supervised), `starts.npy`
(sequence offsets; sequence 2k is pair k's chosen, 2k+1 its rejected), `rows.npy` (pair offsets
of each packed row, pairs stored in row order: best-fit decreasing by pair length, never split),
`records.npy` (each pair's 0-based record index); `meta.json` (counts, pad id, stop ids);
`tokenizer/` with the chat template, for exports.

Batches (`PreferenceBatches`, the sample order of SFTBatches: the state is (seed, global row
cursor), resume is exact): each micro-batch dict holds, for B rows of L = seq_len tokens,
- `input_ids`, `position_ids`, `labels` [B, L] int64: as SFT's (positions restart at 0 at each
  sequence, so attention stays inside it; labels[t] = token t+1 when that is a supervised token
  of the same sequence, else -100);
- `seq_ids` [B, L] int64: for each label position, the index within the micro-batch of its
  sequence (row by row, left to right), -1 where labels is -100;
- `chosen_index`, `rejected_index` [P] int64: each pair's two sequence indices;
- `pair_ids` [P] int64: the pair's index in the split (its storage order), the key of
  precomputed reference log-probabilities;
- `response_lengths` [S = 2P] int64: labelled tokens per sequence.
Every training row holds at least one pair, so P >= B; only `wrap=False` (validation) pads its
last step with empty rows, where P may be 0 (every rank still runs the same forward passes).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llmtrain.data.atomic import atomic_dir
from llmtrain.data.chat import ChatTemplate, check_mask
from llmtrain.data.sft import (
    cache_key,
    checked_messages,
    data_files,
    encode_records,
    pad_id,
    read_records,
    record_field,
    record_prompt,
    write_cache_files,
)
from llmtrain.data.sft_batches import IGNORE, SFTBatches, pack_rows, row_arrays
from llmtrain.errors import UserError

CACHE_VERSION = 1
_CHUNK = 256  # records encoded per call (two conversations each)


# ---------------------------------------------------------------------------------------------
# Records -> the two conversations of a pair


def _messages(value: Any, where: str, field: str) -> list[dict]:
    """A side or the shared turns as a list of {role, content} messages (validated)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise UserError(f"{where}: {field!r} must be a string, a {{role, content}} message or a list of them")
    return checked_messages(items, where, f"{field!r} message")


def pair_conversations(record: dict, data, where: str) -> tuple[list[dict], list[dict], int]:
    """(chosen conversation, rejected conversation, number of assistant turns in the shared part)."""
    if record.get(data.messages_field) is not None:
        if not isinstance(record[data.messages_field], list) or not record[data.messages_field]:
            raise UserError(f"{where}: {data.messages_field!r} must be a non-empty list of {{role, content}} messages")
        shared = _messages(record[data.messages_field], where, data.messages_field)
    else:
        value = record.get(data.prompt_field)
        if isinstance(value, list):
            shared = _messages(value, where, data.prompt_field)
        else:
            system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
            shared = [
                *system,
                {"role": "user", "content": record_prompt(record, data, data.prompt_field, "data.prompt_field", where)},
            ]
    sides = []
    for name, key in ((data.chosen_field, "data.chosen_field"), (data.rejected_field, "data.rejected_field")):
        side = _messages(record_field(record, name, where, key), where, name)
        if not any(m["role"] == "assistant" for m in side):
            raise UserError(f"{where}: {name!r} has no assistant message, so nothing to compare; give it an assistant turn")
        sides.append([*shared, *side])
    return sides[0], sides[1], sum(m["role"] == "assistant" for m in shared)


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for t, m in enumerate([*mask, 0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _side_mask(mask: list[int], conv: list[dict], shared_turns: int, template: ChatTemplate, where: str) -> list[int]:
    """The assistant mask with the shared turns' assistant spans cleared."""
    spans = _spans(mask)
    turns = sum(m["role"] == "assistant" for m in conv)
    if len(spans) != turns:
        raise UserError(
            f"{where}: chat template {template.name} marks {len(spans)} assistant stretches for {turns} assistant "
            "turns, so the answer's tokens cannot be told from the shared turns'; choose another data.chat_template"
        )
    if not shared_turns:
        return list(mask)
    cut = spans[shared_turns][0]
    return [0] * cut + list(mask[cut:])


# ---------------------------------------------------------------------------------------------
# Truncation


def _largest(fits, lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with fits(x), given fits(lo) and fits non-increasing in x."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_pair(prompts: tuple[int, int], responses: tuple[int, int], seq_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """prompt_first: the (prompt, response) token counts each side keeps so that chosen + rejected
    fit seq_len (module docstring): prompts cut from the left down to seq_len // 4, then responses
    cut from the right to a common length."""
    (pc, pr), (rc, rr) = prompts, responses
    if pc + pr + rc + rr <= seq_len:
        return prompts, responses
    top = max(pc, pr)
    floor = min(top, seq_len // 4)
    size = lambda k: min(pc, k) + min(pr, k) + rc + rr  # noqa: E731
    if size(floor) <= seq_len:
        k = _largest(lambda k: size(k) <= seq_len, floor, top)
        return (min(pc, k), min(pr, k)), responses
    kept = (min(pc, floor), min(pr, floor))
    budget = seq_len - sum(kept)
    c = _largest(lambda c: min(rc, c) + min(rr, c) <= budget, 0, max(rc, rr))
    return kept, (min(rc, c), min(rr, c))


# ---------------------------------------------------------------------------------------------
# The cache


def preference_key(data, tokenizer, template: ChatTemplate, seq_len: int, seed: int) -> str:
    """SFT's cache key (data bytes, tokenizer, template, data settings, seq_len, seed), namespaced."""
    inner = cache_key(data, tokenizer, template, seq_len, seed)
    return hashlib.sha256(f"preference/{CACHE_VERSION}/{inner}".encode()).hexdigest()[:20]


def _check_format(data) -> None:
    if data.format not in ("auto", "preference"):
        raise UserError(
            f"data.format={data.format} is an SFT format; preference data is read with data.format=preference "
            "(or auto): records with a prompt (or messages) and chosen/rejected answers"
        )


def split_orders(n: int, data, seed: int, n_val_records: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """(train record order, validation record order), as SFT's build_cache splits: a seeded
    permutation; validation from `data.val_path` (n_val_records, permuted with seed + 1) or the
    first `val_fraction` of it (at least one record when val_fraction > 0)."""
    order = np.random.default_rng(seed).permutation(n)
    if n_val_records is not None:
        val_order, train_order = np.random.default_rng(seed + 1).permutation(n_val_records)[: data.max_val_examples], order
    else:
        n_val = min(data.max_val_examples, int(round(n * data.val_fraction)))
        if data.val_fraction > 0 and n > 1:
            n_val = max(n_val, 1)
        val_order, train_order = order[:n_val], order[n_val:]
    if data.max_examples is not None:
        train_order = train_order[: data.max_examples]
    return train_order, val_order


def build_preference_cache(data, tokenizer, template: ChatTemplate, seq_len: int, seed: int, root: Path) -> Path:
    """Tokenize the preference records of `data` into ROOT/<key>/ unless that is already complete."""
    if data.path is None:
        raise UserError("no preference data: set data.path=FILE (JSONL/JSON/Parquet records with prompt, chosen, rejected)")
    _check_format(data)
    key = preference_key(data, tokenizer, template, seq_len, seed)
    target = Path(root) / key
    if (target / "meta.json").is_file():
        print(f"llmtrain: preference data: reusing {target} (same data, tokenizer, template and settings)", file=sys.stderr)
        return target
    files = data_files(data.path)
    records = read_records(files)
    val_files = data_files(data.val_path, "data.val_path") if data.val_path is not None else None
    val_records = read_records(val_files, "data.val_path") if val_files is not None else records
    train_order, val_order = split_orders(len(records), data, seed, len(val_records) if val_files is not None else None)

    def named(fs: list[Path], path: Path):
        return lambda i: f"{fs[0] if len(fs) == 1 else path}: record {i + 1}"

    where = named(files, data.path)
    vwhere = named(val_files, data.val_path) if val_files is not None else where
    with atomic_dir(target, replace=True) as tmp:
        train = _encode_split(records, train_order, data, tokenizer, template, seq_len, where, data.path, "train")
        if not train["ids"]:
            raise UserError(
                f"{data.path}: no training pairs left ({_summary(train)}); "
                "check that chosen and rejected differ, raise data.seq_len, or set data.pair_truncation=prompt_first"
            )
        meta = {
            "format": "preference",
            "template": template.name,
            "seq_len": seq_len,
            "pair_truncation": data.pair_truncation,
            "train": _write_split(tmp, "train", train, seq_len, data.packing),
        }
        stops = set(train["stops"])
        if len(val_order):
            val = _encode_split(
                val_records, val_order, data, tokenizer, template, seq_len, vwhere, data.val_path or data.path, "val"
            )
            meta["val"] = _write_split(tmp, "val", val, seq_len, data.packing)
            stops |= val["stops"]
        meta.update({"stop_ids": sorted(stops), "key": key, "pad_id": pad_id(tokenizer)})
        write_cache_files(tmp, tokenizer, template, meta)
    t = meta["train"]
    print(
        f"llmtrain: preference data (template {template.name}): {t['pairs']:,} train pairs in {t['rows']:,} rows of "
        f"{seq_len} ({t['fill']:.0%} filled); {meta.get('val', {}).get('pairs', 0):,} validation; {_summary(train)}; "
        f"cache {target}",
        file=sys.stderr,
    )
    return target


def _summary(split: dict) -> str:
    parts = [f"{split['read']:,} read"]
    cut, dropped = split["truncated"], split["dropped"]
    if cut["prompt"] or cut["response"]:
        parts.append(f"{cut['prompt']:,} with the prompt cut, {cut['response']:,} with the answers cut")
    reasons = {
        "identical": "with chosen identical to rejected",
        "identical_after_truncation": "identical once cut",
        "too_long": "longer than seq_len",
        "no_response": "without answer tokens after truncation",
    }
    parts += [f"{dropped[k]:,} {text}, dropped" for k, text in reasons.items() if dropped[k]]
    return ", ".join(parts)


def _encode_split(records, order, data, tokenizer, template, seq_len: int, where, path, name: str) -> dict:
    out = {
        "ids": [],
        "masks": [],
        "records": [],
        "stops": set(),
        "read": len(order),
        "truncated": {"prompt": 0, "response": 0},
        "dropped": {"identical": 0, "identical_after_truncation": 0, "too_long": 0, "no_response": 0},
    }
    longest = 0
    for begin in range(0, len(order), _CHUNK):
        idx = [int(i) for i in order[begin : begin + _CHUNK]]
        pairs = [pair_conversations(records[i], data, where(i)) for i in idx]
        encoded = encode_records(
            template, tokenizer, [conv for c, r, _ in pairs for conv in (c, r)], [i for i in idx for _ in range(2)], where
        )
        for k, i in enumerate(idx):
            sides = []
            for s in range(2):
                ids, mask = encoded[2 * k + s]
                mask = _side_mask(mask, pairs[k][s], pairs[k][2], template, where(i))
                problem = check_mask(ids, mask, template, tokenizer, truncated=False)
                if problem:
                    raise UserError(f"{where(i)}: {problem}")
                sides.append((list(ids), mask))
            if sides[0][0] == sides[1][0]:
                out["dropped"]["identical"] += 1
                continue
            for ids, mask in sides:
                out["stops"].add(int(ids[max(t for t in range(len(mask)) if mask[t])]))
            total = len(sides[0][0]) + len(sides[1][0])
            if total > seq_len:
                longest = max(longest, total)
                if data.pair_truncation != "prompt_first":
                    out["dropped"]["too_long"] += 1
                    continue
                sides = _cut(sides, seq_len, out["truncated"])
                if sides[0][0] == sides[1][0]:
                    out["dropped"]["identical_after_truncation"] += 1
                    continue
                if any(not any(mask[1:]) for _, mask in sides):
                    out["dropped"]["no_response"] += 1
                    continue
            for ids, mask in sides:
                out["ids"].append(np.asarray(ids, dtype=np.int32))
                out["masks"].append(np.asarray(mask, dtype=np.uint8))
            out["records"].append(i)
    too_long = out["dropped"]["too_long"]
    if data.pair_truncation == "error" and too_long:
        raise UserError(
            f"{path}: {too_long:,} of {len(order):,} {name} pairs do not fit seq_len {seq_len} as one row "
            f"(chosen + rejected, longest {longest:,} tokens); set data.pair_truncation=prompt_first or drop, "
            "or raise data.seq_len"
        )
    return out


def _cut(sides: list[tuple[list[int], list[int]]], seq_len: int, counts: dict) -> list[tuple[list[int], list[int]]]:
    firsts = [mask.index(1) for _, mask in sides]
    prompts = (firsts[0], firsts[1])
    responses = (len(sides[0][0]) - firsts[0], len(sides[1][0]) - firsts[1])
    keep_p, keep_r = fit_pair(prompts, responses, seq_len)
    counts["prompt"] += int(keep_p != prompts)
    counts["response"] += int(keep_r != responses)
    out = []
    for (ids, mask), first, p, r in zip(sides, firsts, keep_p, keep_r):
        out.append((ids[first - p : first + r], mask[first - p : first + r]))
    return out


def _write_split(tmp: Path, name: str, split: dict, seq_len: int, packing: bool) -> dict:
    """Pack and save a split (no files when no pair is left: PreferenceSplit.open gives None)."""
    lengths = np.asarray([len(x) for x in split["ids"]], dtype=np.int64)
    order, rows = pack_rows(lengths[0::2] + lengths[1::2], seq_len, packing)
    seqs = np.stack([2 * order, 2 * order + 1], axis=1).reshape(-1)  # chosen then rejected of each pair, in row order
    starts = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths[seqs], out=starts[1:])
    if len(seqs):
        np.save(tmp / f"{name}_tokens.npy", np.concatenate([split["ids"][s] for s in seqs]))
        np.save(tmp / f"{name}_mask.npy", np.concatenate([split["masks"][s] for s in seqs]))
        np.save(tmp / f"{name}_starts.npy", starts)
        np.save(tmp / f"{name}_records.npy", np.asarray(split["records"], dtype=np.int64)[order])
        np.save(tmp / f"{name}_rows.npy", rows)
    supervised = int(sum(int(m[1:].sum()) for m in split["masks"]))
    return {
        "read": split["read"],
        "pairs": len(order),
        "rows": len(rows) - 1,
        "tokens": int(starts[-1]),
        "supervised_tokens": supervised,
        "fill": float(starts[-1] / max(1, (len(rows) - 1) * seq_len)),
        "truncated": dict(split["truncated"]),
        "dropped": dict(split["dropped"]),
    }


# ---------------------------------------------------------------------------------------------
# Reading the cache and serving batches


@dataclass
class PreferenceSplit:
    """One split of a preference cache, memory-mapped; pairs stored in row order."""

    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray  # [2 * pairs + 1] sequence offsets
    rows: np.ndarray  # [rows + 1] pair offsets
    records: np.ndarray  # [pairs] 0-based record index of each pair

    @classmethod
    def open(cls, cache: Path, name: str) -> Optional[PreferenceSplit]:
        cache = Path(cache)
        if not (cache / f"{name}_rows.npy").is_file():
            return None
        load = lambda part: np.load(cache / f"{name}_{part}.npy", mmap_mode="r")  # noqa: E731
        return cls(load("tokens"), load("mask"), load("starts"), load("rows"), load("records"))

    @property
    def num_rows(self) -> int:
        return len(self.rows) - 1

    @property
    def num_pairs(self) -> int:
        return len(self.records)

    def pair(self, k: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((chosen ids, mask), (rejected ids, mask)) of pair k."""
        a, b, c = (int(x) for x in self.starts[2 * k : 2 * k + 3])
        return (self.tokens[a:b], self.mask[a:b]), (self.tokens[b:c], self.mask[b:c])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, mask, sequence start offsets within the row, pair ids) of row r."""
        first, last = int(self.rows[r]), int(self.rows[r + 1])
        a, b = int(self.starts[2 * first]), int(self.starts[2 * last])
        return (
            self.tokens[a:b],
            self.mask[a:b],
            np.asarray(self.starts[2 * first : 2 * last]) - a,
            np.arange(first, last, dtype=np.int64),
        )


def row_sequences(labels: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence of each label position within the row, -1 where unlabelled; labelled tokens per
    sequence) for a row of sequences at `starts` holding `length` tokens."""
    seq = np.full(len(labels), -1, dtype=np.int64)
    if len(starts):
        seq[:length] = np.searchsorted(starts, np.arange(length), side="right") - 1
    seq[labels == IGNORE] = -1
    return seq, np.bincount(seq[seq >= 0], minlength=len(starts)).astype(np.int64)


class PreferenceBatches(SFTBatches):
    """Deterministic, rank-sharded, resumable batches of packed pairs (module docstring); the
    order of rows is SFTBatches' (same constructor, same seeded permutation per epoch)."""

    def state_dict(self) -> dict:
        return {"kind": "preference", "seed": self.seed, "sample": self._sample, "rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "preference" or state.get("rows") != self.num_rows:
            raise UserError(
                f"the checkpoint's data position ({state}) is not from this preference data ({self.num_rows} rows); "
                "resume with the same data and data settings, or use a new run.dir"
            )
        self.seed, self._sample = int(state["seed"]), int(state["sample"])

    def next_step(self) -> list[dict]:
        """This rank's `grad_accum` micro-batches of the next global batch."""
        per_rank = self.micro_batch_size * self.grad_accum
        first = self._sample + self.rank * per_rank
        self._sample += per_rank * self.world_size
        rows = [self._row_index(first + j) for j in range(per_rank)]
        return [
            self.micro_batch(rows[m * self.micro_batch_size : (m + 1) * self.micro_batch_size]) for m in range(self.grad_accum)
        ]

    def micro_batch(self, rows: list[Optional[int]]) -> dict:
        """The micro-batch of these rows of the split (None: an empty padding row)."""
        import torch

        ids, labels, pos, seq_ids, lengths, pair_ids = [], [], [], [], [], []
        offset = 0
        for r in rows:
            empty = np.zeros(0, dtype=np.int64)
            tokens, mask, starts, pids = (empty,) * 4 if r is None else self.split.row(r)
            i, lab, p = row_arrays(tokens, mask, starts if len(starts) else np.zeros(1, np.int64), self.seq_len, self.pad_id)
            seq, n = row_sequences(lab, starts, len(tokens))
            ids.append(i)
            labels.append(lab)
            pos.append(p)
            seq_ids.append(np.where(seq >= 0, seq + offset, -1))
            lengths.append(n)
            pair_ids.append(pids)
            offset += len(starts)
        pairs = np.arange(offset // 2, dtype=np.int64)
        as_tensor = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
        return {
            "input_ids": torch.from_numpy(np.stack(ids)),
            "labels": torch.from_numpy(np.stack(labels)),
            "position_ids": torch.from_numpy(np.stack(pos)),
            "seq_ids": torch.from_numpy(np.stack(seq_ids)),
            "chosen_index": torch.from_numpy(2 * pairs),
            "rejected_index": torch.from_numpy(2 * pairs + 1),
            "pair_ids": as_tensor(pair_ids),
            "response_lengths": as_tensor(lengths),
        }
