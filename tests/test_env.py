"""The UFO environment: chat-template token pieces (checked against the template's own rendering with the real
Qwen2.5 tokenizer and a character-level one), episode stepping and hand-computed rewards, the stop tokens
(a turn's end, or the checkpoint's generation_config) and a task's prompt limit. UFO's reward against its code:
tests/test_ufo_reward.py.
Run: `python -m pytest -q tests/test_env.py`."""
import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nanoufo.config import TrainConfig, read_config_file
from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.options import EnvOptions
from nanoufo.task import load_task
from nanoufo.tokenizer import load_tokenizer

QUESTION = "What is 3 * 6?"
ATTEMPTS = [  # (response text, ended with <|im_end|>): the second one was cut off by the token limit
    (r"3 * 6 = 17, so the answer is $\boxed{17}$.", True),
    (r"Let me recompute: 3 * 6 = 1", False),
    (r"It is $\boxed{18}$.", True),
]


def char_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with the Qwen special tokens and the given chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars + ["<unk>"])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                                   chat_template=chat_template)


@pytest.fixture(params=["qwen", "chars"])
def tokenizer(request, qwen_tokenizer):
    return qwen_tokenizer if request.param == "qwen" else char_tokenizer(qwen_tokenizer.chat_template)


def rollout_ids(env: UFOEnv, tokenizer) -> tuple[list[int], list[int]]:
    """The token sequence a sampler builds for ATTEMPTS, and its loss mask (1 on the attempts' tokens)."""
    ids = env.prompt_ids(QUESTION)
    mask = [0] * len(ids)
    for turn, (text, ended_with_stop) in enumerate(ATTEMPTS):
        if turn > 0:
            feedback = env.feedback_ids(ended_with_stop=ATTEMPTS[turn - 1][1])
            ids, mask = ids + feedback, mask + [0] * len(feedback)
        sampled = tokenizer(text, add_special_tokens=False)["input_ids"]
        sampled += [env.turn_end_id] if ended_with_stop else []
        ids, mask = ids + sampled, mask + [1] * len(sampled)
    return ids, mask


@pytest.mark.parametrize("system_prompt", [None, "You are a careful mathematician."])
def test_conversation_tokens_match_the_chat_template(tokenizer, system_prompt):
    env = UFOEnv(tokenizer, EnvOptions(system_prompt=system_prompt))
    ids, mask = rollout_ids(env, tokenizer)
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    conversation = system + [{"role": "user", "content": f"{QUESTION} {env.options.instruction}"}]
    for turn, (text, _) in enumerate(ATTEMPTS):
        feedback = [{"role": "user", "content": "Try again."}] if turn else []
        conversation += feedback + [{"role": "assistant", "content": text}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == tokenizer.decode(ids) + "\n"  # the template's final newline follows the last <|im_end|>
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"][:-1]
    assert (system_prompt or "You are Qwen") in tokenizer.decode(env.prompt_ids(QUESTION))
    # the loss mask covers exactly the sampled text and the <|im_end|> the model wrote itself
    sampled = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert sampled == ATTEMPTS[0][0] + "<|im_end|>" + ATTEMPTS[1][0] + ATTEMPTS[2][0] + "<|im_end|>"


def test_stop_ids_and_feedback_text(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(feedback="Wrong, think again."))
    assert env.stop_ids == qwen_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert qwen_tokenizer.decode(env.feedback_ids(ended_with_stop=True)) == \
        "\n<|im_start|>user\nWrong, think again.<|im_end|>\n<|im_start|>assistant\n"
    assert env.feedback_ids(ended_with_stop=False) == [env.turn_end_id] + env.feedback_ids(ended_with_stop=True)


def play(env: UFOEnv, responses: list[str], gold: str = "18") -> tuple[Episode, list[bool]]:
    episode = Episode(Problem("q", gold, "test:0"))
    return episode, [env.step_batch([episode], [response])[0] for response in responses]


def test_solved_at_once(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer)
    episode, over = play(env, [r"\boxed{18.0}"])
    assert over == [True] and (episode.solved, episode.solved_turn, episode.turns) == (True, 0, 1)
    assert env.turn_rewards(episode) == [1.0]
    with pytest.raises(ValueError, match="already over"):
        env.step_batch([episode], [r"\boxed{18}"])


def test_decay_and_repetition_penalty(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(turn_decay=0.5, repetition_penalty=0.5))
    episode, over = play(env, [r"\boxed{3}", r"\boxed{\dfrac{6}{2}}", r"\boxed{18}"])
    assert over == [False, False, True] and episode.solved_turn == 2
    # solved at turn 2: 0.5**2 = 0.25; 3 and \frac{6}{2} are spelled differently, so E = 3 = T: no penalty
    assert sum(env.turn_rewards(episode)) == pytest.approx(0.25)
    episode, _ = play(env, [r"\boxed{3}", r"\boxed{ 3 }", r"\boxed{18}"])
    # E = 2 distinct of T = 3: 0.25 - 0.5 * (1 - 2/3) = 1/12, all of it on the last turn
    assert env.turn_rewards(episode) == pytest.approx([0.0, 0.0, 1 / 12])


def test_unsolved_episode_with_format_penalty(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=3, turn_decay=0.5, repetition_penalty=0.5, format_penalty=0.1))
    episode, over = play(env, ["I do not know.", r"\boxed{17}", r"\boxed{17.0}"])
    assert over == [False, False, True] and episode.answers == [None, "17", "17.0"]
    assert (episode.solved, episode.solved_turn) == (False, None)
    # answers None, 17, 17: the missing one pays the format penalty only; E = 1 of the T = 2 valid answers
    assert env.turn_rewards(episode) == pytest.approx([-0.1, 0.0, -0.5 * (1 - 1 / 2)])
    assert sum(env.turn_rewards(episode)) == pytest.approx(-0.1 - 0.25)
    episode, _ = play(env, ["no answer", "still none", r"\boxed{}"])
    # no valid answer: the format penalty, no repetition penalty
    assert sum(env.turn_rewards(episode)) == pytest.approx(-0.3)
    episode, _ = play(env, [r"\boxed{4}", "none", r"\boxed{5}"])
    assert env.turn_rewards(episode) == pytest.approx([0.0, -0.1, 0.0])  # E = T = 2: no repetition


def test_decay_counts_answered_attempts_and_an_unacceptable_answer_is_a_repeat(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(turn_decay=0.5, repetition_penalty=0.5, format_penalty=0.1))
    episode, _ = play(env, ["no answer here", r"\boxed{18}"])
    # as in UFO's code, the answerless attempt pays the format penalty and does not advance the decay
    assert env.turn_rewards(episode) == pytest.approx([-0.1, 1.0])
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=3, repetition_penalty=0.5, format_penalty=0.1),
                 accepts=lambda problem, answer, attempt: len(answer) == 2 and attempt == rf"\boxed{{{answer}}}")
    episode, _ = play(env, [r"\boxed{3433}", r"\boxed{17}", r"\boxed{4}"])
    assert episode.acceptable == [False, True, False]
    # an unacceptable answer pays the format penalty, and counts as a repeat: T = 3 answers, E = 1
    assert env.turn_rewards(episode) == pytest.approx([-0.1, 0.0, -0.1 - 0.5 * (1 - 1 / 3)])
    boxes, _ = play(env, [r"\boxed{1\boxed{17}"])  # the task sees the whole attempt, not only the answer in it
    assert [boxes.answers, boxes.acceptable] == [["17"], [False]]


def test_by_default_an_answer_is_acceptable_when_math_verify_reads_an_expression(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=4))
    episode, _ = play(env, [r"\boxed{x+}", r"\boxed{\frac{1}{2}}", "none", r"\boxed{18}"])
    assert episode.acceptable == [False, True, False, True]


def test_step_batch_and_bad_settings(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=2))
    episodes = [Episode(Problem("q", gold, f"test:{i}")) for i, gold in enumerate(["18", r"\frac{1}{2}"])]
    assert env.step_batch(episodes, [r"\boxed{17}", r"\boxed{0.5}"]) == [False, True]
    assert env.step_batch(episodes[:1], [r"\boxed{17}"]) == [True]
    assert [e.correct for e in episodes] == [[False, False], [True]]
    unlabeled = [Episode(Problem("q", None, "prompts:0")), Episode(Problem("q", "18", "test:2"))]
    assert env.step_batch(unlabeled, [r"\boxed{18}", r"\boxed{18}"]) == [False, True]  # no gold: never correct
    assert unlabeled[0].answers == ["18"] and unlabeled[0].correct == [False]
    with pytest.raises(ValueError, match="format_penalty=-0.1 must be a finite number >= 0"):
        UFOEnv(qwen_tokenizer, EnvOptions(format_penalty=-0.1))


def test_prompts_fit_at_exactly_the_limit(tokenizer):
    env = UFOEnv(tokenizer)
    n = len(env.prompt_ids(QUESTION))
    assert env.prompts_fit([QUESTION, QUESTION + " Show your work."], n) == [True, False]
    assert env.prompts_fit([QUESTION], n - 1) == [False]


UFO_CODE_FEEDBACK = ("Reward:\n{reward}\n\nTurn {turn}:\nState:\nIncorrect. Please think again.\nYou have {actions_left} "
                     "actions left.")


def test_ufo_codes_format_forced_think_exact_grading_and_feedback_with_reward_and_actions(qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(
        max_turns=5, answer_format="think_answer", grading="exact", system_prompt="You're a helpful assistant. ",
        instruction="Only give the final answer.", feedback=UFO_CODE_FEEDBACK,
        user_template="{instruction}\nTurn 1:\nState:\n{question}\nYou have {actions_left} actions left."))
    prompt = qwen_tokenizer.decode(env.prompt_ids("What is 6 x 3?"))
    assert prompt.startswith("<|im_start|>system\nYou're a helpful assistant. <|im_end|>\n<|im_start|>user\n")
    assert "Only give the final answer.\nTurn 1:\nState:\nWhat is 6 x 3?\nYou have 5 actions left." in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>")  # the forced start of the first attempt
    # the attempts as sampled (after the forced "<think>"): no answer, a wrong one, then "18 " in another case
    episode, over = play(env, ["hmm", "6 x 3 is 17 </think> <answer>17</answer>", " </think><answer> 18 </answer>"])
    assert episode.answers == [None, "17", "18"] and episode.correct == [False, False, True] and over[-1]
    first = Episode(Problem("q", "18", "t:0"), ["hmm"], [None], [False], [False])
    text = qwen_tokenizer.decode(env.feedback_ids(True, first))  # an attempt without an answer spends no action
    assert text == ("\n<|im_start|>user\nReward:\n0.0\n\nTurn 2:\nState:\nIncorrect. Please think again.\nYou have 5 "
                    "actions left.<|im_end|>\n<|im_start|>assistant\n<think>")
    second = Episode(Problem("q", "18", "t:0"), ["hmm", "x"], [None, "17"], [False, False], [False, True])
    assert "Turn 3:" in qwen_tokenizer.decode(env.feedback_ids(True, second))
    assert "You have 4 actions left." in qwen_tokenizer.decode(env.feedback_ids(False, second))
    assert env.max_feedback_tokens() >= len(env.feedback_ids(False, second))
    with pytest.raises(ValueError, match="placeholders"):
        env.feedback_ids(True)


def test_the_ufo_presets_user_turn_is_the_codes_text_with_its_final_newline(qwen_tokenizer):
    """ctx_manager.py:298-307 (UFO's code): the user turn ends "... Max response length: 1000 words (tokens).\\n";
    an empty instruction leaves no stray space (the demo's template "{question} {instruction}")."""
    preset = TrainConfig(**read_config_file(str(Path(__file__).resolve().parents[1] / "config" / "ufo_qwen2.5_3b.py")))
    env = UFOEnv(qwen_tokenizer, preset.env_options(preset.instruction))
    prompt = qwen_tokenizer.decode(env.prompt_ids(" What is 6 x 3? "))
    assert ("<|im_start|>user\nYou are solving Math problems. Only give the final answer between <answer> and "
            "</answer>.\nTurn 1:\nState:\nWhat is 6 x 3?\nYou have 5 actions left. Always output: <think> [Your "
            "thoughts] </think> <answer> [your answer] </answer> with no extra text. Strictly follow this format. "
            "Max response length: 1000 words (tokens).\n<|im_end|>\n") in prompt
    bare = qwen_tokenizer.decode(UFOEnv(qwen_tokenizer, EnvOptions(instruction="")).prompt_ids("Q?"))
    assert "<|im_start|>user\nQ?<|im_end|>" in bare


def test_stop_tokens_from_the_generation_config():
    """A base Qwen2.5 tokenizer (eos <|endoftext|>) with its generation_config's eos 151643: the attempt ends
    there only, not also at <|im_end|> (stop_tokens="generation_config"); the default ends a turn at <|im_end|>."""
    base = load_tokenizer()
    base.eos_token = "<|endoftext|>"
    end_of_text, im_end = base.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert UFOEnv(base).stop_ids == [im_end, end_of_text]
    env = UFOEnv(base, EnvOptions(max_turns=1, stop_tokens="generation_config"), generation_eos_ids=[end_of_text])
    assert env.stop_ids == [end_of_text]
    other = UFOEnv(base, EnvOptions(stop_tokens="generation_config"), generation_eos_ids=[151646, 151647])
    assert other.stop_ids == [end_of_text, 151646, 151647]  # the tokenizer's eos, then the config's, as vLLM


def test_a_task_reads_the_generation_config_and_skips_training_prompts_over_max_prompt_tokens(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "What is 2+3?", "answer": "5"},
                                                            {"question": "What is 1+1? " * 30, "answer": "2"}]))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151646, 151643]}))
    cfg = TrainConfig(init_from=str(tmp_path), train_data=str(data), eval_data=str(data), train_format="generic",
                      eval_format="generic", stop_tokens="generation_config", max_prompt_tokens=60)
    lines = []
    task = load_task(cfg, context=4096, report=lines.append)
    assert task.generation_eos_ids == (151646, 151643)
    assert task.env(cfg).stop_ids == [151645, 151646, 151643]  # the bundled tokenizer's eos is <|im_end|>
    assert len(task.train) == 1 and len(task.evals["rows"]) == 2  # held out: every prompt that fits the context
    assert sum("skipped 1 problems whose prompt is longer than 60 tokens (max_prompt_tokens)" in line
               for line in lines) == 1
    assert any("an attempt ends at ['<|im_end|>', '<|object_ref_start|>', '<|endoftext|>']" in line for line in lines)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id '</s>' is not a token id"):
        load_task(cfg, context=4096, report=lines.append)


def test_a_reward_function_replaces_the_environments_reward(qwen_tokenizer, tmp_path):
    """UFOEnv's `reward`: a number lands on the last attempt, a list gives each attempt its own, anything else is an
    error naming the episode; train.py's reward_fn loads the same function from a file (nanoufo.task.load_reward)."""
    from nanoufo.config import TrainConfig
    from nanoufo.task import Task, load_reward
    responses = [r"\boxed{17}", r"\boxed{18}"]
    by_episode = UFOEnv(qwen_tokenizer, reward=lambda episode: 10.0 * episode.solved - episode.turns)
    assert by_episode.turn_rewards(play(by_episode, responses)[0]) == [0.0, 8.0]
    by_attempt = UFOEnv(qwen_tokenizer, reward=lambda episode: [float(c) for c in episode.correct])
    assert by_attempt.turn_rewards(play(by_attempt, responses)[0]) == [0.0, 1.0]
    wrong = UFOEnv(qwen_tokenizer, reward=lambda episode: [1.0])
    with pytest.raises(ValueError, match=r"returned \[1.0\] for episode test:0 of 2 attempts"):
        wrong.turn_rewards(play(wrong, responses)[0])
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def solved(episode):\n    return 2.0 if episode.solved else -1.0\n")
    cfg = TrainConfig(reward_fn=f"{rewards}:solved")
    env = Task(qwen_tokenizer, [], {}).env(cfg)
    assert env.turn_rewards(play(env, responses)[0]) == [0.0, 2.0]
    with pytest.raises(ValueError, match="defines no function 'missing'"):
        load_reward(f"{rewards}:missing")
    with pytest.raises(ValueError, match="write it as file.py:function"):
        load_reward("no_colon")
