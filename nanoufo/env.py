"""The UFO environment: a math problem, up to `max_turns` attempts, and after each wrong
attempt only the feedback text ("Try again."). It owns the chat-template token pieces the sampler needs,
grades attempts and computes rewards. Its options travel as one EnvOptions (train.py builds it from the run's
config, whose keys have the same names).

    env = UFOEnv(tokenizer, EnvOptions(max_turns=5, answer_format="boxed"))
    ids = env.prompt_ids(problem.question)        # system + user turn + assistant header
    episode = Episode(problem)
    over, = env.step_batch([episode], [response_text])   # extract, grade, record; True when it ends
    ids += response_ids + env.feedback_ids(ended_with_stop=True)   # when it goes on
    rewards = env.turn_rewards(episode)           # each attempt's; their sum is the episode's reward

Works with any Hugging Face tokenizer whose chat template uses <|im_start|>/<|im_end|> turns: the feedback
tokens are derived from the template itself. Tests: `python -m pytest -q tests/test_env.py`.
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nanoufo.data import Problem
from nanoufo.grader import (count_distinct_answers, exact_match, extract_answer, extract_think_answer, grade_batch,
                            parse_batch)
from nanoufo.options import ANSWER_FORMATS, EnvOptions

TURN_END = "<|im_end|>"
RESPONSE_SENTINEL = "<<nanoufo-response>>"  # stands in for an attempt while the template is rendered
FEEDBACK_SENTINEL = "<<nanoufo-feedback>>"  # stands in for a feedback text with placeholders
# answer_format -> (the text every attempt is forced to start with, how an answer is read from it)
READERS = dict(zip(ANSWER_FORMATS, (("", extract_answer), ("<think>", extract_think_answer)), strict=True))


@dataclass
class Episode:
    problem: Problem
    responses: list[str] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)  # extracted final answers, None if none
    correct: list[bool] = field(default_factory=list)
    acceptable: list[bool] = field(default_factory=list)  # an answer the task can accept (False without one)

    @property
    def turns(self) -> int:
        """Attempts made so far."""
        return len(self.responses)

    @property
    def solved(self) -> bool:
        return any(self.correct)

    @property
    def solved_turn(self) -> int | None:
        """The 0-based turn of the correct attempt (episodes end on it), or None."""
        return self.correct.index(True) if self.solved else None


class UFOEnv:
    def __init__(self, tokenizer, options: EnvOptions | None = None,
                 accepts: Callable[[Problem, str, str], bool] | None = None,
                 reward: Callable[[Episode], float | list[float]] | None = None, generation_eos_ids: Sequence[int] = ()):
        """options: EnvOptions (default: the run's defaults). `accepts(problem, answer, attempt)` says whether
        the task can accept an attempt's extracted answer at all, right or wrong, given the attempt's text too
        (the demo: one digit of the question's range, and nothing but its \\boxed{}); None: math-verify reads
        an expression in the answer (with exact grading: any answer). answer_format "think_answer", UFO's
        code's, starts every attempt with a forced "<think>" and reads <think>..</think><answer>..</answer>.
        The feedback may hold {reward} (0.0: an attempt that goes on was wrong), {turn} (the next attempt's
        number, from 1) and {actions_left} (max_turns - the attempts that gave an answer), as UFO's code's
        feedback turn does. `reward(episode)` replaces the environment's reward: a number for the episode, or a
        list of one per attempt (turn_rewards); the episode holds every attempt, its answers and their grades.
        generation_eos_ids: the checkpoint's generation_config.json eos_token_id(s), which end an attempt under
        stop_tokens "generation_config" (nanoufo.task reads them)."""
        self.tokenizer, self.options, self.accepts, self.reward = tokenizer, options or EnvOptions(), accepts, reward
        self.generation_eos_ids = tuple(generation_eos_ids)
        self.response_prefix, self.extract = READERS[self.options.answer_format]
        self.turn_end_id = tokenizer.convert_tokens_to_ids(TURN_END)
        if self.turn_end_id is None or self.turn_end_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {TURN_END} token; UFOEnv needs a chat template with "
                             "<|im_start|>/<|im_end|> turns")
        if not self.stop_ids:
            raise ValueError("the tokenizer has no eos token and the checkpoint's generation_config.json names "
                             "none: nothing would end an attempt (stop_tokens='generation_config')")
        self._between = self._derive_feedback_text()  # holds FEEDBACK_SENTINEL where the feedback text goes
        feedback = self.options.feedback
        fixed = not any(f"{{{key}}}" in feedback for key in ("reward", "turn", "actions_left"))
        self._fixed_feedback = {stop: self._feedback_tokens(stop, feedback) for stop in (False, True)} \
            if fixed else None  # by ended_with_stop

    @property
    def max_turns(self) -> int:
        return self.options.max_turns

    def _render(self, question: str, turns: tuple[dict, ...] = (), add_generation_prompt: bool = True) -> str:
        """The template's text of the opening ((system), user turn with question and instruction) and `turns`."""
        o = self.options
        system = [] if o.system_prompt is None else [{"role": "system", "content": o.system_prompt}]
        # an empty {instruction} leaves a space at an end; a template's own newlines stay (UFO's turn ends in one)
        user = _fill(o.user_template, question=question.strip(), instruction=o.instruction,
                     actions_left=o.max_turns).strip(" ")
        messages = system + [{"role": "user", "content": user}, *turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _derive_feedback_text(self) -> str:
        """The template's text between the end of an attempt's content and the next attempt's content:
        the assistant turn's close, the feedback user turn and the assistant header. Found as the difference
        between renderings of the same conversation with and without the extra turns."""
        attempt = {"role": "assistant", "content": RESPONSE_SENTINEL}
        prompt = self._render("question")
        answered = self._render("question", (attempt,), add_generation_prompt=False)
        retried = self._render("question", (attempt, {"role": "user", "content": FEEDBACK_SENTINEL}))
        if not answered.startswith(prompt + RESPONSE_SENTINEL) or not retried.startswith(answered):
            raise ValueError("the chat template does not render a conversation as prompt + attempt + rest; "
                             "cannot derive the feedback turn's tokens from it")
        between = retried[len(prompt) + len(RESPONSE_SENTINEL):]  # (turn close)(feedback turn)(assistant header)
        if not between.startswith(TURN_END):
            raise ValueError(f"the chat template does not close an assistant turn with {TURN_END}: {between!r}")
        return between

    def prompt_ids(self, question: str) -> list[int]:
        """The episode's opening tokens: (system), user turn with question and instruction, assistant header
        (and the forced start of the first attempt)."""
        return self._encode(self._prompt_text(question))

    def _prompt_text(self, question: str) -> str:
        return self._render(question) + self.response_prefix

    def prompts_fit(self, questions: list[str], max_tokens: int) -> list[bool]:
        """Whether each question's prompt has at most max_tokens tokens. Only prompts whose text has more
        than max_tokens - 1 UTF-8 bytes are tokenized: a byte-level BPE token (Qwen's) covers at least one
        byte, and the - 1 leaves room for a tokenizer that prepends a word-start piece."""
        texts = [self._prompt_text(q) for q in questions]
        return [len(text.encode()) < max_tokens or len(self._encode(text)) <= max_tokens for text in texts]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an attempt. stop_tokens "turn_end": <|im_end|>, then the tokenizer's eos and
        <|endoftext|> where distinct; "generation_config": the tokenizer's eos and generation_eos_ids, as vLLM
        stops a request that names no stop tokens (verl's rollouts)."""
        if self.options.stop_tokens == "generation_config":
            candidates = [self.tokenizer.eos_token_id, *self.generation_eos_ids]
        else:
            candidates = [self.turn_end_id, self.tokenizer.eos_token_id,
                          self.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        return list(dict.fromkeys(i for i in candidates if i is not None and i != self.tokenizer.unk_token_id))

    def feedback_ids(self, ended_with_stop: bool, episode: Episode | None = None) -> list[int]:
        """Tokens appended after a wrong attempt so the next one can start: the close of the assistant turn,
        the user turn with the feedback text, the assistant header (and the forced start of the next attempt).
        `ended_with_stop`: the attempt's last sampled token was <|im_end|> (it is part of the attempt then);
        False after a token limit (or any other stop token), and the close's <|im_end|> is included here, not
        sampled. `episode` fills the feedback's placeholders (a fixed feedback text needs none)."""
        if self._fixed_feedback is not None:
            return list(self._fixed_feedback[ended_with_stop])
        if episode is None:
            raise ValueError(f"the feedback {self.options.feedback!r} has placeholders: pass the episode")
        answered = sum(answer is not None for answer in episode.answers)
        text = _fill(self.options.feedback, reward=0.0, turn=episode.turns + 1, actions_left=self.max_turns - answered)
        return self._feedback_tokens(ended_with_stop, text)

    def _feedback_tokens(self, ended_with_stop: bool, text: str) -> list[int]:
        between = self._between.replace(FEEDBACK_SENTINEL, text) + self.response_prefix
        return self._encode(between[len(TURN_END):] if ended_with_stop else between)

    def max_feedback_tokens(self) -> int:
        """The longest feedback turn (with its placeholders at their widest), for the sampler's max_len."""
        text = _fill(self.options.feedback, reward=0.0, turn=self.max_turns, actions_left=self.max_turns)
        return len(self._feedback_tokens(False, text))

    def step_batch(self, episodes: list[Episode], response_texts: list[str]) -> list[bool]:
        """Grade each episode's attempt and record it, with one call into the grader's worker; per episode,
        True when it is over (correct, or max_turns reached)."""
        for episode in episodes:
            if self.is_over(episode):
                raise ValueError(f"episode {episode.problem.id} is already over after {episode.turns} attempts")
        attempts = [self.response_prefix + text for text in response_texts]  # what the answer is read from
        answers = [self.extract(attempt) for attempt in attempts]
        labeled = [i for i, episode in enumerate(episodes) if episode.problem.answer is not None]
        golds = [episodes[i].problem.answer for i in labeled]
        if self.options.grading == "exact":
            graded = [exact_match(answers[i], gold) for i, gold in zip(labeled, golds)]
        else:
            graded = grade_batch([answers[i] for i in labeled], golds, self.options.grade_timeout)
        verdicts = dict(zip(labeled, graded))  # an unlabeled problem (label-free training) is never correct
        acceptable = self._acceptable([episode.problem for episode in episodes], answers, attempts)
        for i, (episode, text, answer) in enumerate(zip(episodes, response_texts, answers)):
            episode.responses.append(text)
            episode.answers.append(answer)
            episode.correct.append(verdicts.get(i, False))
            episode.acceptable.append(acceptable[i] or episode.correct[-1])  # a correct answer is acceptable
        return [self.is_over(episode) for episode in episodes]

    def _acceptable(self, problems: list[Problem], answers: list[str | None], attempts: list[str]) -> list[bool]:
        """Whether the task can accept each attempt (see __init__'s `accepts`); no answer is not acceptable."""
        given = [i for i, answer in enumerate(answers) if answer is not None]
        if self.accepts is None and self.options.grading == "exact":  # UFO's code: any non-empty answer is an action
            verdicts = [True] * len(given)
        elif self.accepts is None:
            verdicts = parse_batch([answers[i] for i in given], self.options.grade_timeout)
        else:
            verdicts = [self.accepts(problems[i], answers[i], attempts[i]) for i in given]
        found = dict(zip(given, verdicts))
        return [found.get(i, False) for i in range(len(answers))]

    def is_over(self, episode: Episode) -> bool:
        return episode.solved or episode.turns >= self.max_turns

    def turn_rewards(self, episode: Episode) -> list[float]:
        """Each attempt's share of the episode reward: the task's own reward function when it has one (`reward`:
        a float is the episode's, on its last attempt; a list has one reward per attempt), else the
        environment's (env_rewards)."""
        if self.reward is None:
            return self.env_rewards(episode)
        given = self.reward(episode)
        rewards = [0.0] * (episode.turns - 1) + [given] if isinstance(given, (int, float)) else list(given)
        if len(rewards) != episode.turns or not all(isinstance(r, (int, float)) for r in rewards):
            raise ValueError(f"the reward function returned {given!r} for episode {episode.problem.id} of "
                             f"{episode.turns} attempts: give a number, or a list of one number per attempt")
        return [float(r) for r in rewards]

    def env_rewards(self, episode: Episode) -> list[float]:
        """Each attempt's share of the environment's reward. As UFO's code counts it: turn_decay**t on the correct
        attempt, t the attempts before it that gave an answer (one without an answer does not advance the
        decay); minus format_penalty on each attempt without an answer the task can accept (no answer, or
        one `accepts` rejects: UFO's code charges it for an action outside an environment's action set); and
        on the last attempt the repetition penalty repetition_penalty * (1 - E/T) over the T attempts that
        gave an answer, E the distinct answers among them (spelled as distinct_by says), charged as
        repetition_charged says. Unlike UFO's code, E counts acceptable answers only: an unacceptable one
        counts as a repeat, so a new invalid answer ("3433" for "from 1 to 4") costs more than repeating a
        valid one, never less."""
        o, rewards, t = self.options, [], 0  # t: the attempts so far that gave an answer
        for answer, correct, ok in zip(episode.answers, episode.correct, episode.acceptable):
            rewards.append((o.turn_decay ** t if correct else 0.0) - (0.0 if ok else o.format_penalty))
            t += answer is not None
        share = distinct_answer_share(episode, o.distinct_by)
        if share is not None and repetition_is_charged(episode, o):
            rewards[-1] -= o.repetition_penalty * (1 - share)
        return rewards


def repetition_is_charged(episode: Episode, options: EnvOptions) -> bool:
    """Whether the episode pays the repetition penalty: always under repetition_charged "any_answer"; under
    "solved_or_all_answered" (UFO's code: its environment computes the penalty only on the step that ends it,
    correct or its max_turns-th answer; a turn without an answer never steps it) only when solved or when
    every one of its max_turns attempts gave an answer."""
    answered = sum(answer is not None for answer in episode.answers)
    return options.repetition_charged == "any_answer" or episode.solved or answered >= options.max_turns


def distinct_answer_share(episode: Episode, distinct_by: str = "normalized") -> float | None:
    """E / T of the repetition penalty: T the attempts that gave an answer, E the distinct answers among the
    acceptable ones, spelled as grader.answer_key(answer, distinct_by) (an unacceptable answer counts as a
    repeat); None without any answer."""
    answered = [answer for answer in episode.answers if answer is not None]
    accepted = [answer for answer, ok in zip(episode.answers, episode.acceptable) if ok]
    return count_distinct_answers(accepted, distinct_by) / len(answered) if answered else None


def _fill(template: str, **values) -> str:
    """template with each {name} replaced by its value; other braces (LaTeX's) are left alone."""
    for name, value in values.items():
        template = template.replace(f"{{{name}}}", str(value))
    return template
