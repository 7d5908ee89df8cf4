"""Config parsing and validation (nanoufo/config.py): files, overrides, types, and clear errors.

    python -m pytest -q tests/test_config.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoufo.config import TrainConfig, parse_args, save_config


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_the_demo_and_valid():
    cfg = parse_args([])
    assert cfg == TrainConfig() and cfg.is_demo and cfg.algorithm == "ufo_ppo"


def test_file_then_command_line_with_types(tmp_path):
    path = write(tmp_path, "import math\nmax_turns = 3\nactor_lr = 1  # an int is fine for a float\n_private = 9\n")
    cfg = parse_args([path, "--max_turns=2", "--whiten_advantages=false", "--resume", "--kl_coef=5e-3"])
    assert (cfg.max_turns, cfg.actor_lr, cfg.whiten_advantages, cfg.resume, cfg.kl_coef) == (2, 1.0, False, True, 0.005)
    assert isinstance(cfg.actor_lr, float)


def test_unknown_key_in_file_names_file_key_and_close_match(tmp_path):
    path = write(tmp_path, "max_turn = 3\n")
    with pytest.raises(KeyError, match=r"cfg\.py.*'max_turn'.*did you mean max_turns"):
        parse_args([path])


def test_unknown_key_on_command_line():
    with pytest.raises(KeyError, match=r"command line.*'actor_rl'.*actor_lr"):
        parse_args(["--actor_rl=1e-6"])


def test_wrong_type_in_file_and_on_command_line(tmp_path):
    with pytest.raises(TypeError, match=r"cfg\.py: max_turns = '5' has type str, expected int"):
        parse_args([write(tmp_path, "max_turns = '5'\n")])
    with pytest.raises(ValueError, match=r"--max_turns='five' is not a valid int"):
        parse_args(["--max_turns=five"])
    with pytest.raises(ValueError, match=r"--resume='maybe' is not a boolean"):
        parse_args(["--resume=maybe"])
    with pytest.raises(ValueError, match="needs a value"):
        parse_args(["--max_turns"])


@pytest.mark.parametrize("args, message", [
    (["--algorithm=dpo"], "algorithm='dpo' is not one of ufo_ppo, grpo"),
    (["--max_turns=0"], "max_turns=0 must be at least 1"),
    (["--keep_groups=16", "--n_samples_per_problem=3", "--minibatch_size=10"], "not divisible by minibatch_size=10"),
    (["--keep_groups=80"], "keep_groups=80 must be between 0 and problems_per_step=32"),
    (["--algorithm=grpo", "--n_samples_per_problem=1", "--minibatch_size=8"], "n_samples_per_problem must be >= 2"),
    (["--reward_placement=per_turn", "--reward=self_certainty"], "per_turn"),
    (["--reward_placement=per_step"], "reward_placement='per_step' needs algorithm='ufo_ppo' and reward='prm'"),
    (["--reward=prm"], "reward='prm' needs prm=<process reward model directory>"),
    (["--reward=prm", "--prm=.", "--prm_gold_weight=1.5"], "prm_gold_weight=1.5 must be in"),
    (["--format_penalty=-0.1"], "format_penalty=-0.1 must be a finite number >= 0"),
    (["--grad_clip=-1"], "grad_clip=-1.0 must be a finite number >= 0"),  # 0, not a negative bound, turns it off
    (["--reward=prm", "--prm=.", "--prm_aggregate=mean"], "prm_aggregate='mean' is not one of min, product"),
    (["--dual_clip=1.0"], "dual_clip > 1"),
    (["--eval_data=data/gsm8k/test.jsonl"], "both be 'demo'"),
    (["--dtype=float16"], "dtype='float16' cannot train (no loss scaling); use bfloat16 or float32"),
    (["--reward=self_certainty", "--reward_fn=mine.py:reward"], "reward_fn replaces the environment's reward"),
    (["--cuda_graphs=yes"], "cuda_graphs='yes' is not one of auto, true, false"),
    (["--cuda_graphs=yes"], "cuda_graphs='yes' is not one of auto, true, false"),
    (["--max_prompt_tokens=0"], "max_prompt_tokens=0 must be at least 1"),
    (["--stop_tokens=eos"], "stop_tokens='eos' is not one of turn_end, generation_config"),
    (["--repetition_charged=never"], "repetition_charged='never' is not one of any_answer, solved_or_all_answered"),
    (["--distinct_by=lower"], "distinct_by='lower' is not one of normalized, squeezed"),
    (["--aggregation=micro-mean"], "aggregation='micro-mean' is not one of token-mean, seq-mean, seq-mean-token-mean, "
                                   "chunk-token-mean"),
    (["--chunk_rows=0"], "chunk_rows=0 must be at least 1"),
    (["--critic_head_init=xavier"], "critic_head_init='xavier' is not one of zero, normal"),
])
def test_impossible_combinations_are_rejected(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(args)


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py: config file not found"):
        parse_args([str(tmp_path / "nope.py")])
    with pytest.raises(FileNotFoundError, match="init_from='/no/such/ckpt'"):
        parse_args(["--init_from=/no/such/ckpt"])
    with pytest.raises(FileNotFoundError, match="train_data=.*missing.jsonl"):
        parse_args([f"--init_from={tmp_path}", f"--train_data={tmp_path}/missing.jsonl",
                    "--eval_data=data/gsm8k/test.jsonl"])


@pytest.mark.parametrize("name", ["ufo_qwen2.5_3b.py", "intuitor_qwen2.5_3b.py"])
def test_paper_configs_parse(tmp_path, name):
    data = write(tmp_path, "", "train.jsonl")
    cfg = parse_args([f"config/{name}", f"--init_from={tmp_path}", f"--train_data={data}"])
    assert not cfg.is_demo and cfg.init_from == str(tmp_path)


def test_saved_config_round_trips(tmp_path):
    cfg = parse_args(["--max_turns=3"])
    save_config(cfg, tmp_path / "config.json")
    assert TrainConfig(**json.loads((tmp_path / "config.json").read_text())) == cfg


def test_paper_configs_carry_the_papers_numbers():
    from dataclasses import replace
    from nanoufo.config import TrainConfig, eval_sets, read_config_file
    config_dir = Path(__file__).resolve().parent.parent / "config"
    ufo = read_config_file(str(config_dir / "ufo_qwen2.5_3b.py"))
    assert (ufo["format_penalty"], ufo["repetition_penalty"], ufo["aggregation"]) == (0.1, 0.5, "seq-mean")
    assert (ufo["problems_per_step"], ufo["n_samples_per_problem"], ufo["keep_groups"], ufo["minibatch_size"],
            ufo["max_new_tokens"], ufo["dual_clip"], ufo["weight_decay"]) == (8, 16, 2, 8, 400, 0.0, 0.01)
    assert (ufo["answer_format"], ufo["grading"], ufo["system_prompt"]) == ("think_answer", "exact",
                                                                         "You're a helpful assistant. ")
    intuitor = TrainConfig(**read_config_file(str(config_dir / "intuitor_qwen2.5_3b.py")))
    assert (intuitor.max_steps, intuitor.lr_schedule, intuitor.lr_warmup_ratio) == (58, "cosine", 0.1)
    assert intuitor.max_new_tokens == 3072 and intuitor.ppo_epochs == 1
    assert intuitor.minibatch_size == intuitor.batch_episodes == 128 * 8  # one optimizer step per rollout
    assert (intuitor.kl_estimator, intuitor.kl_clamp, intuitor.user_template, intuitor.eval_temperature) == (
        "k3", 10.0, "{question}", 0.0)
    assert intuitor.system_prompt.endswith("Please stop generation immediately after outputing the box.")
    assert (intuitor.stop_tokens, intuitor.aggregation, intuitor.chunk_rows) == ("generation_config",
                                                                               "chunk-token-mean", 4)
    ufo_cfg = TrainConfig(**ufo)
    assert (ufo_cfg.repetition_charged, ufo_cfg.distinct_by, ufo_cfg.critic_head_init, ufo_cfg.train_format) == (
        "solved_or_all_answered", "squeezed", "normal", "metamath_first")
    assert ufo_cfg.stop_tokens == "turn_end"  # multi-turn: an attempt ends at its turn's end
    assert [s.name for s in eval_sets(intuitor)] == ["math500", "gsm8k"]
    assert [s.name for s in eval_sets(replace(intuitor, eval_data="a/test.jsonl,b/test.jsonl,b/x.jsonl"))] == [
        "a", "b", "x"]


def test_reading_a_config_imports_neither_torch_nor_triton():
    """python -m nanoufo.plan and the scripts' argument errors must not wait for (or need) torch and Triton."""
    code = "import sys, nanoufo.config; print(sorted({'torch', 'triton'} & {m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"


def test_greedy_evaluation_is_allowed_and_negative_temperatures_are_not():
    assert parse_args(["--eval_temperature=0"], check_paths=False).eval_temperature == 0.0  # verl's validation
    for bad in ("--eval_temperature=-0.1", "--temperature=0"):
        with pytest.raises(ValueError, match="temperature"):
            parse_args([bad], check_paths=False)


def test_help_prints_the_paper_configs_reference_table():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "train.py", "config/ufo_qwen2.5_3b.py", "--help"], cwd=root,
                          capture_output=True, text=True)
    header = "| setting | UFO's code (file:line at commit b9eb4bd, 2025-08-15) | here |"
    assert done.returncode == 0 and header in done.stdout
    assert "| repetition penalty |" in done.stdout and "distinct_by = 'squeezed'" in done.stdout
    bad = subprocess.run([sys.executable, "train.py", "nosuch.py", "--help"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "nosuch.py: config file not found"
