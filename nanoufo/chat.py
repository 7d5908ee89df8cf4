"""A chat on the terminal where you play the UFO environment: the model answers a question, you reply with
feedback (an empty line sends the default, "Try again."), `/new <question>` or `/quit`. The conversation
lives in one KV cache row of the sampler, so each turn prefills only your reply and decodes the answer.

    python sample.py --ckpt=out/ufo_qwen2.5_3b/ckpt-200/actor --mode=chat
    python sample.py --tiny --mode=chat          # a tiny random model, no checkpoint

Tests: python -m pytest -q tests/test_sample_cli.py -k chat (stdin scripted, in process)
"""
import sys

from dataclasses import replace

from nanoufo.env import UFOEnv
from nanoufo.model import Qwen2
from nanoufo.options import EnvOptions, SamplingOptions
from nanoufo.sampler import generate

CHAT_TURNS = 1000  # a chat ends on /new, /quit, end of input or the context limit, not on a turn count


def chat(model: Qwen2, tokenizer, env_options: EnvOptions, sampling: SamplingOptions, *, max_len: int,
         seed: int, generation_eos_ids: tuple[int, ...] = ()) -> None:
    """Conversations until /quit or the end of stdin, in the environment env_options describe (its prompts,
    answer format, default feedback and stop tokens, with the checkpoint's generation_eos_ids); conversation n
    samples with seed + n."""
    feedback = env_options.feedback
    envs = {feedback: UFOEnv(tokenizer, env_options, generation_eos_ids=generation_eos_ids)}  # per feedback text
    print(f"Ask a question. After each answer type feedback (empty line: {feedback!r}), /new <question> or /quit.")
    question, n_conversations = read_line("question> "), 0
    while question is not None:
        ended = []  # once you end the conversation: the next question (None after /quit)

        def next_turn(rows, responses, stopped):
            response = responses[0]
            print(f"model> {tokenizer.decode(response[:-1] if stopped[0] else response)}\n", flush=True)
            reply = read_line("you> ")
            if reply is None or reply.strip() == "/quit":
                ended.append(None)
                return [None]
            if reply.startswith("/new"):
                ended.append(reply[len("/new"):].strip() or read_line("question> "))
                return [None]
            text = reply.strip() or feedback
            env = envs.setdefault(text, UFOEnv(tokenizer, replace(env_options, feedback=text),
                                                generation_eos_ids=generation_eos_ids))
            return [env.feedback_ids(stopped[0] and response[-1] == env.turn_end_id)]

        prompt = envs[feedback].prompt_ids(question)
        generate(model, [prompt], next_turn, sampling, max_turns=CHAT_TURNS, stop_ids=envs[feedback].stop_ids,
                 seed=seed + n_conversations, max_len=max(max_len, len(prompt)))
        n_conversations += 1
        if not ended:
            print(f"(the conversation filled --max-len={max_len} tokens; ask a new question)")
            ended.append(read_line("question> "))
        question = ended[0]


def read_line(prompt: str) -> str | None:
    """A line from stdin (None at end of input); the prompt is echoed when stdin is not a terminal."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not sys.stdin.isatty():
        print(line)
    return line
