"""The built-in CPU demo: a character tokenizer, a synthetic guessing task and a tiny Qwen2 model.

    python train.py                  # warm-up, then UFO PPO on this task (the default config)
    task = demo_task(cfg)                                             # train.py's set-up of the demo
    warm_up_once(cfg, warmup_dir, par, task.env(cfg), task.train)     # after the memory plan

The task, "Guess my number": the question names a range of 3 to 5 digits, e.g. "Game 417: guess my
number from 3 to 6", and the gold answer is one digit of that range, picked at random when the problem is
made. One attempt can only guess (1/3 to 1/5 right), but every wrong answer rules a digit out, so a model
that revises after "Try again." (a different digit each turn) solves every problem within 5 turns, while
one that repeats itself does not. That is the behaviour UFO trains for. (An earlier version listed
additions and hid one of their sums; the tiny model's warm-up did not learn to read the sums within the
CPU budget: docs/demo-history.md.) Questions whose text hashes into the held-out quarter never appear in training (the
game number makes the texts many; the 21 ranges themselves occur in both splits).

The tokenizer is a transformers PreTrainedTokenizerFast with one token per printable character (plus the
role names, "\\boxed{" and the feedback "Try again." as single tokens, which keeps episodes short), the
Qwen specials <|endoftext|>, <|im_start|>, <|im_end|> and a Qwen-style chat template (no system turn), so
nanoufo.env.UFOEnv runs on it unchanged.

The warm-up is supervised on episodes of a forgetful guesser: at each turn it picks uniformly among the
digits it has not tried, or, with probability WARMUP_FORGET, among all of them. It teaches the format, the
range and a weak habit of not repeating, which RL then has to strengthen. Why not an independent guesser:
from one the model never learns to look at its earlier attempts, and RL from there did not find that
either (docs/demo-history.md). Even the careful guesser's habit only appears after about 1,500 warm-up steps.
Tests: python -m pytest -q tests/test_demo.py
"""
import random
import string
import zlib
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from nanoufo.config import TrainConfig
from nanoufo.data import Problem
from nanoufo.env import UFOEnv
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.parallel import ParallelContext, barrier
from nanoufo.task import Task
from nanoufo.trainer import sft_loss
from nanoufo.weights import save_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "\\boxed{", "Try again."]  # whole tokens keep episodes short
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
CHAT_TEMPLATE = ("{%- for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                 "{%- endfor %}"
                 "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
N_CANDIDATES = (3, 4, 5)
HELD_OUT_BUCKETS = 4  # one question in four (by text hash) is held out
N_TRAIN_PROBLEMS = 20000  # more than any demo run samples, so training rarely sees a question twice
N_TEST_PROBLEMS = 200
WARMUP_BATCH = 32
WARMUP_FORGET = 0.5  # per turn: the chance that the warm-up guesser ignores what it tried
# The tiny model: 2 layers, grouped-query attention, tied embeddings (0.11M parameters).
TINY_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True, max_position_embeddings=1024)


def build_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """One token per printable character, the words (WORDS), and the three Qwen specials (ids 0-2)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every character is its own token
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    backend.add_tokens([AddedToken(w, normalized=False) for w in words])  # matched before the characters
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def is_held_out(question: str) -> bool:
    return zlib.crc32(question.encode()) % HELD_OUT_BUCKETS == 0


def random_problem(rng: random.Random) -> tuple[str, str]:
    """(question, gold): a game number, a range of 3 to 5 digits, and one digit of that range."""
    low = rng.randint(0, 10 - (n := rng.choice(N_CANDIDATES)))
    question = f"Game {rng.randint(100, 999)}: guess my number from {low} to {low + n - 1}"
    return question, str(rng.randint(low, low + n - 1))


def make_problems(split: str, n: int, seed: int) -> list[Problem]:
    """n problems of the "train" or "test" split; the same seed gives the same list."""
    if split not in ("train", "test"):
        raise ValueError(f"demo: unknown split {split!r} (train or test)")
    rng = random.Random(f"{split}-{seed}")
    problems = []
    while len(problems) < n:
        question, gold = random_problem(rng)
        if is_held_out(question) == (split == "test"):
            problems.append(Problem(question, gold, f"demo/{split}:{len(problems)}"))
    return problems


def candidates(question: str) -> list[str]:
    """Every digit of the question's range: the answers an attempt may give."""
    low, high = question.split(" from ")[1].split(" to ")
    return [str(d) for d in range(int(low), int(high) + 1)]


def accepts(problem: Problem, answer: str, attempt: str) -> bool:
    """Whether the task can accept an attempt, right or wrong (UFOEnv's `accepts`): one digit of the question's
    range and nothing but its \\boxed{}. "3433" or "7" for "from 1 to 4" is not, nor "\\boxed{1D\\boxed{2}",
    which the grader reads as 2: a policy left free to write such attempts drifted into them in RL."""
    return answer in candidates(problem.question) and attempt == f"\\boxed{{{answer}}}"


def build_model(vocab_size: int, seed: int, value_head: bool = False) -> Qwen2:
    """The tiny model, randomly initialised (value_head: a critic, whose trunk starts as the seed's actor)."""
    model = Qwen2(QwenConfig(vocab_size=vocab_size, **TINY_MODEL), value_head=value_head)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def warmup_episode(env, tokenizer, problem: Problem, rng: random.Random, max_turns: int):
    """Token ids and loss mask of one episode of the forgetful guesser, in the environment's own format."""
    options = candidates(problem.question)
    ids = list(env.prompt_ids(problem.question))
    mask = [0] * len(ids)
    tried = set()
    for turn in range(max_turns):
        guess = rng.choice(options if rng.random() < WARMUP_FORGET else [d for d in options if d not in tried])
        tried.add(guess)
        ids += tokenizer.encode(f"\\boxed{{{guess}}}", add_special_tokens=False) + [env.stop_ids[0]]
        mask += [1] * (len(ids) - len(mask))
        if guess == problem.answer or turn == max_turns - 1:
            break
        ids += env.feedback_ids(True)
        mask += [0] * (len(ids) - len(mask))
    return ids, mask


def warmup(model: Qwen2, env: UFOEnv, problems: list[Problem], steps: int, lr: float, max_turns: int,
           seed: int) -> float:
    """Supervised steps on forgetful-guesser episodes (a progress bar); returns the last loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="warm-up")
    for step in bar:
        episodes = [warmup_episode(env, env.tokenizer, rng.choice(problems), rng, max_turns)
                    for _ in range(WARMUP_BATCH)]
        tokens = pad_sequence([torch.tensor(ids) for ids, _ in episodes], batch_first=True,
                              padding_value=env.tokenizer.pad_token_id)  # (B, T)
        mask = pad_sequence([torch.tensor(m, dtype=torch.float32) for _, m in episodes], batch_first=True)  # (B, T)
        for group in optimizer.param_groups:  # cosine decay to 10% keeps the end of the warm-up stable
            group["lr"] = lr * (0.55 + 0.45 * torch.cos(torch.tensor(step / steps * torch.pi)).item())
        loss = sft_loss(model, tokens.to(device), mask.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def demo_task(cfg: TrainConfig) -> Task:
    """The demo run's task: the character tokenizer, training problems, {"demo": held-out problems}; its
    questions need no instruction, and it accepts one boxed digit of the range (accepts)."""
    return Task(build_tokenizer(), make_problems("train", N_TRAIN_PROBLEMS, cfg.seed),
                {"demo": make_problems("test", cfg.n_eval_problems or N_TEST_PROBLEMS, cfg.seed)},
                instruction="", accepts=accepts)


def warm_up_once(cfg: TrainConfig, warmup_dir: Path, par: ParallelContext, env: UFOEnv,
                 problems: list[Problem]) -> None:
    """The supervised warm-up on the training environment env, written to warmup_dir by the main process,
    unless it is there (later runs and resumes reuse it; the other ranks wait for it)."""
    if (warmup_dir / "config.json").is_file():
        return
    if par.is_main:
        model = build_model(len(env.tokenizer), cfg.seed).to(par.device)
        loss = warmup(model, env, problems, cfg.warmup_steps, cfg.warmup_lr, cfg.max_turns, cfg.seed)
        print(f"warm-up: {cfg.warmup_steps} steps, final loss {loss:.4f}; saved to {warmup_dir}")
        save_model(model, warmup_dir)
    barrier(par)
