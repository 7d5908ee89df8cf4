"""What bench/peers.py gives both systems, TRL's GRPOTrainer (bench/peers_trl.py) and nanoufo
(bench/peers_nanoufo.py): one GRPO workload, written to a JSON file that each system's worker process reads,
the reward functions both call on each completion's text, and what a worker writes back.

    python bench/peers.py --preset tiny      # builds a Workload, runs both workers on it, compares

A workload is a saved checkpoint (HF layout, its tokenizer beside it), the prompts as user-turn texts (the
chat template's default system turn is added by each system), and the GRPO settings that both map onto
their own options: samples per prompt, tokens per answer, temperature, clip range, optimizer, minibatch.
"""
import json
import re
import resource
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter, process_time

import torch

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass
class Workload:
    checkpoint: str  # HF checkpoint directory, tokenizer included
    prompts: list[dict]  # {"content": the user turn's text, "answer": the gold answer}
    prompts_per_step: int
    samples: int  # completions per prompt (the GRPO group)
    max_new_tokens: int
    steps: int  # rollouts; each is followed by (samples * prompts_per_step / minibatch) * epochs optimizer steps
    minibatch: int  # completions per optimizer step
    epochs: int = 1  # passes over each rollout (nanoufo's ppo_epochs, TRL's num_iterations)
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    lr: float = 1e-6
    grad_clip: float = 1.0
    reward: str = "hash"  # a name in REWARDS
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    save_to: str = ""  # where a worker saves its trained weights ("" = not saved)

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.samples

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass over a rollout."""
        return self.rollout_size // self.minibatch

    def step_prompts(self, step: int) -> list[dict]:
        """The prompts of rollout `step`: the next prompts_per_step in order, as TRL's unshuffled sampler takes them."""
        start = step * self.prompts_per_step % len(self.prompts)
        return (self.prompts * 2)[start:start + self.prompts_per_step]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "Workload":
        return cls(**json.loads(Path(path).read_text()))


def text_hash(text: str, answer: str) -> float:
    """A stand-in score in [0, 1): the completion's CRC-32 scaled. A random model solves no GSM8K problem, so a
    real grade would be 0 everywhere, every GRPO advantage 0 and the timed update a no-op; this spreads the
    scores, costs nothing, and is the same function of the same text in both systems."""
    return zlib.crc32(text.encode()) / 2**32


def boxed_answer(text: str, answer: str) -> float:
    """1 when the completion's last \\boxed{} holds exactly the gold answer, else 0."""
    found = BOXED.findall(text)
    return float(bool(found) and found[-1].strip() == answer)


REWARDS = {"hash": text_hash, "boxed": boxed_answer}


@dataclass(frozen=True)
class Clock:
    """A wall time and this process's CPU time (user + system, every thread), or a difference of two. On a
    shared machine the CPU seconds move less with the other jobs than the wall seconds."""
    wall: float
    cpu: float

    @classmethod
    def now(cls) -> "Clock":
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's queued work belongs to the phase that queued it
        return cls(perf_counter(), process_time())

    def __sub__(self, other: "Clock") -> "Clock":
        return Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other: "Clock") -> "Clock":
        return Clock(self.wall + other.wall, self.cpu + other.cpu)

    def named(self, phase: str) -> dict:
        return {phase: self.wall, f"{phase}_cpu": self.cpu}


def phase_times(generation: Clock, scoring: Clock, update: Clock) -> dict:
    """A step's row: each phase's wall and CPU seconds, and the whole step's."""
    return (generation.named("generation") | scoring.named("scoring") | update.named("update")
            | (generation + scoring + update).named("step"))


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; else the process's peak resident set (Linux: KiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_result(path: str | Path, system: str, work: Workload, steps: list[dict], **info) -> None:
    """A worker's answer: one row per rollout (phase seconds, tokens, mean reward) and its peak memory."""
    Path(path).write_text(json.dumps(dict(system=system, steps=steps, peak_gib=peak_memory_gib(work.device),
                                          **info)))
