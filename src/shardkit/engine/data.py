"""Training data: a deterministic synthetic set shaped like the seed's (6000 x 2048 tokens), or an
instruction file tokenized with a local tokenizer. Every data set has a fingerprint that goes into the
results, so two runs can be shown to have seen the same tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import UsageError
from ..spec.datasets import read_records

IGNORE_INDEX = -100  # HF's label value for tokens left out of the loss


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length examples: ``input_ids`` and ``labels`` (prompt and padding masked with -100)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, description: dict):
        self.input_ids, self.labels = input_ids, labels
        digest = hashlib.sha256(input_ids.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
        self.info = {**description, "examples": len(input_ids), "tokens_per_example": input_ids.shape[1],
                     "fingerprint": "sha256:" + digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def synthetic(num_examples: int, length: int, vocab_size: int, seed: int) -> TokenDataset:
    """Walks through one fixed random permutation of the vocabulary from a random start token: each next
    token is a function of the current one, so a model can learn it (the loss falls), and the set is a pure
    function of its four arguments."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab_size, generator=generator)
    tokens = torch.empty(num_examples, length, dtype=torch.int64)
    tokens[:, 0] = torch.randint(vocab_size, (num_examples,), generator=generator)
    for position in range(1, length):
        tokens[:, position] = successor[tokens[:, position - 1]]
    return TokenDataset(tokens, tokens, {"kind": "synthetic-permutation-walk", "seed": seed,
                                                  "vocab_size": vocab_size})


def load_tokenizer(tokenizer_path: str):
    """The local tokenizer and its padding id; refused as one line when it cannot load or cannot pad."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the folder holds, it is the user's input
        lines = str(error).strip().splitlines()
        raise UsageError(f"--tokenizer_path {tokenizer_path!r}: cannot load a local tokenizer "
                         f"({lines[0] if lines else type(error).__name__})") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UsageError(f"--tokenizer_path {tokenizer_path!r}: tokenizer has neither a pad nor an eos token")
    return tokenizer, pad_id


def instruction(path: str, tokenizer_path: str, length: int) -> TokenDataset:
    """Prompt + response + EOS, truncated or right-padded to ``length``; only response tokens count in the loss."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--data_path {path!r}: no such file")
    tokenizer, pad_id = load_tokenizer(tokenizer_path)
    records = read_records(file)
    input_ids = torch.full((len(records), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(records), length), IGNORE_INDEX, dtype=torch.int64)
    for index, record in enumerate(records):
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[:length]
        input_ids[index, : len(ids)] = torch.tensor(ids)
        answer = slice(min(len(prompt), length), len(ids))
        labels[index, answer] = input_ids[index, answer]
    return TokenDataset(input_ids, labels, {"kind": "instruction", "path": str(file),
                                            "tokenizer": str(tokenizer_path)})


def build_dataset(cfg, model_spec, length: int) -> TokenDataset:
    if cfg.data_path:
        return instruction(cfg.data_path, cfg.tokenizer_path or cfg.model_name_or_path, length)
    return synthetic(cfg.num_examples, length, model_spec.hf_config["vocab_size"], cfg.seed)


class RankSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded shuffle, reshuffled each epoch; every rank gets the same number of
    examples (the remainder is dropped), and ``skip`` resumes mid-epoch."""

    def __init__(self, size: int, rank: int, world: int, seed: int):
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.size // self.world - self.skip

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.size // self.world * self.world][self.rank :: self.world]
        return iter(mine[self.skip :].tolist())
