"""The seed's flags, transformers' renamed ones, and one-line errors for bad flags."""

import pytest

from shardkit.errors import UsageError
from shardkit.spec.flags import parse_args
from shardkit.spec.resolve import Launch, resolve

SEED_FSDP = ["--model_name_or_path", "decapoda-research/llama-30b-hf", "--bf16", "True", "--output_dir", "test",
             "--num_train_epochs", "3", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8",
             "--evaluation_strategy", "no", "--save_strategy", "steps", "--save_steps", "100", "--save_total_limit",
             "1", "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--fsdp",
             "full_shard auto_wrap offload", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
             "--gradient_checkpointing", "True", "--tf32", "True"]


def test_seed_fsdp_flags_map_onto_the_config():
    cfg, _ = parse_args(SEED_FSDP)
    assert cfg.model_name_or_path == "decapoda-research/llama-30b-hf"
    assert (cfg.bf16, cfg.tf32, cfg.gradient_checkpointing) == (True, True, True)
    assert cfg.per_device_train_batch_size == 1 and cfg.gradient_accumulation_steps == 8
    assert cfg.learning_rate == 2e-5 and cfg.warmup_ratio == 0.03 and cfg.weight_decay == 0.0
    assert cfg.eval_strategy == "no"  # from the renamed --evaluation_strategy
    assert cfg.fsdp_offload and resolve(cfg, Launch(nproc_per_node=8)).plan.parallelism.name == "fsdp_offload"
    assert cfg.save_steps == 100 and cfg.save_total_limit == 1


def test_new_spelling_and_bare_booleans():
    cfg, launch = parse_args(["--eval_strategy", "no", "--bf16", "--gradient_checkpointing", "false",
                              "--nproc_per_node", "2", "--fsdp", "full_shard auto_wrap"])
    assert cfg.bf16 is True and cfg.gradient_checkpointing is False
    assert launch.nproc_per_node == 2


def test_gpu_memory_cap_is_a_size_in_gib():
    cfg, _ = parse_args(["--max_gpu_memory", "80", "--fsdp", "full_shard auto_wrap"])
    assert cfg.max_gpu_memory == 80.0
    assert parse_args([])[0].max_gpu_memory is None


@pytest.mark.parametrize("argv, fragment", [
    (["--no_such_flag", "1"], "unknown flag '--no_such_flag'"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size '0'"),
    (["--learning_rate", "fast"], "--learning_rate 'fast'"),
    (["--bf16", "maybe"], "--bf16 'maybe'"),
    (["--evaluation_strategy", "steps"], "--eval_strategy 'steps'"),
    (["--fsdp", "full_shard hybrid"], "unsupported option(s) ['hybrid']"),
    (["--fsdp", "full_shard", "--deepspeed", "x.json"], "--fsdp and --deepspeed are exclusive"),
    (["--attn_implementation", "flash"], "--attn_implementation 'flash'"),
    (["--max_gpu_memory", "0"], "--max_gpu_memory '0'"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, fragment):
    with pytest.raises(UsageError) as error:
        parse_args(argv)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("model, layer", [("llama-7b", "LlamaDecoderLayer"), ("Qwen/Qwen2.5-7B", "Qwen2DecoderLayer")])
def test_a_wrap_class_other_than_the_models_decoder_layer_is_one_line_naming_it(model, layer):
    with pytest.raises(UsageError) as error:
        resolve(parse_args(["--model_name_or_path", model, "--fsdp", "full_shard auto_wrap",
                            "--fsdp_transformer_layer_cls_to_wrap", "GPT2Block"])[0])
    assert str(error.value) == f"--fsdp_transformer_layer_cls_to_wrap 'GPT2Block': {model}'s decoder layer is {layer}"
