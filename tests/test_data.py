"""The synthetic set is deterministic and learnable; instruction data masks the prompt."""

import json

import pytest
import torch

from shardkit.engine.data import IGNORE_INDEX, RankSampler, instruction, synthetic
from shardkit.errors import UsageError


def test_synthetic_is_a_pure_function_of_its_arguments():
    a, b = synthetic(50, 32, 256, seed=7), synthetic(50, 32, 256, seed=7)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.info["fingerprint"] == b.info["fingerprint"]
    assert synthetic(50, 32, 256, seed=8).info["fingerprint"] != a.info["fingerprint"]
    assert a.info["examples"] == 50 and a.info["tokens_per_example"] == 32


def test_synthetic_next_token_is_a_function_of_the_current_one():
    data = synthetic(200, 64, 256, seed=1)
    pairs = {}
    for row in data.input_ids.tolist():
        for current, following in zip(row, row[1:], strict=False):
            assert pairs.setdefault(current, following) == following


def test_rank_sampler_partitions_and_resumes():
    shares = [list(RankSampler(10, rank, 3, seed=0)) for rank in range(3)]
    flat = [i for share in shares for i in share]
    assert len(flat) == 9 and len(set(flat)) == 9  # remainder dropped, no overlap
    resumed = RankSampler(10, 1, 3, seed=0)
    resumed.skip = 2
    assert list(resumed) == shares[1][2:]


def test_instruction_data_masks_prompt_and_padding(tmp_path, word_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "what is two plus four", "response": "six"}) + "\n"
                    + json.dumps({"prompt": "say hi", "response": "hello hello"}) + "\n")
    data = instruction(str(path), str(word_tokenizer), length=8)
    first = data[0]
    assert first["input_ids"].tolist() == [3, 4, 5, 6, 7, 8, 1, 0]  # prompt, response, eos, pad
    assert first["labels"].tolist() == [IGNORE_INDEX] * 5 + [8, 1, IGNORE_INDEX]
    assert data[1]["labels"].tolist()[:5] == [IGNORE_INDEX, IGNORE_INDEX, 11, 11, 1]
    truncated = instruction(str(path), str(word_tokenizer), length=4)
    assert truncated[0]["labels"].tolist() == [IGNORE_INDEX] * 4  # only the prompt fits: nothing to learn


def test_malformed_jsonl_names_the_line(tmp_path, word_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "say hi", "response": "hello"}\n{"prompt": "oops"\n')
    with pytest.raises(UsageError, match=r"data.jsonl:2: not valid JSON"):
        instruction(str(path), str(word_tokenizer), length=8)
