"""Reliability (issue 8), in process: checkpoints survive SIGKILL at any moment of a save and refuse damaged
files; adversarial model outputs are extracted in linear time and graded wrong within a time bound; the
sampler stops at the model's context; config mistakes fail before any work; a torn log line is dropped on
resume. train.py itself under faults (SIGKILL and resume, non-finite steps, bad data) and over a long run
is tests/test_soak.py.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_reliability.py
"""
import dataclasses
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from grading_utils import contract_bound, grade_in_thread, started_grader
from nanoufo import checkpoint
from nanoufo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanoufo.config import parse_args
from nanoufo.grader import extract_answer
from nanoufo.logger import JsonlLogger, read_log
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.options import SamplingOptions
from nanoufo.sampler import generate

TINY = QwenConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


# ------------------------------------------------------------------------------------------- checkpoints
def models_and_optimizers(fill: float | None = None):
    """An actor and a critic with AdamW; with `fill`, every weight equals it (a checkpoint's fingerprint)."""
    models = {"actor": Qwen2(TINY), "critic": Qwen2(TINY, value_head=True)}
    for seed, model in enumerate(models.values()):
        model.init_weights(torch.Generator().manual_seed(seed))
        if fill is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(fill)
    return models, {name: torch.optim.AdamW(m.parameters(), lr=1e-2) for name, m in models.items()}


def saved_checkpoint(tmp_path) -> Path:
    models, opts = models_and_optimizers(fill=1.0)
    for model, opt in zip(models.values(), opts.values()):  # give the optimizers some state to save
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
    return save_checkpoint(tmp_path, 3, models, opts, {"data_pos": 12})


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x10  # in the tensor data near the end: the file still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit])
@pytest.mark.parametrize("name", ["actor/model.safetensors", "critic/model.safetensors", "optimizers.pt",
                                  "state.pt"])
def test_a_damaged_checkpoint_file_is_named_at_load(tmp_path, name, damage):
    damage(saved_checkpoint(tmp_path) / name)
    with pytest.raises(ValueError, match=rf"ckpt-3/{name}: .*(truncated|corrupted)"):
        load_checkpoint(tmp_path, *models_and_optimizers())


@pytest.mark.parametrize("pointer", ["", "ckpt-3\x00\x7f", "ckpt-2\n"])
def test_a_damaged_pointer_or_manifest_is_named_at_load(tmp_path, pointer):
    ckpt = saved_checkpoint(tmp_path)
    (tmp_path / "latest").write_text(pointer)
    with pytest.raises(FileNotFoundError, match=r"latest: points at .*, which is not a complete checkpoint"):
        load_checkpoint(tmp_path, *models_and_optimizers())
    (tmp_path / "latest").write_text("ckpt-3\n")
    (ckpt / "manifest.json").write_text('{"state.pt": ')
    with pytest.raises(ValueError, match=r"ckpt-3/manifest.json: .*damaged"):
        load_checkpoint(tmp_path, *models_and_optimizers())


def test_saving_the_same_step_again_never_unlinks_the_latest_first(tmp_path, monkeypatch):
    """A resumed run that stops at once saves the step it loaded; a crash during that save keeps the old one."""
    save_checkpoint(tmp_path, 4, *models_and_optimizers(fill=1.0), {"data_pos": 1})
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(src).is_dir():
            raise KeyboardInterrupt("killed before the rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, *models_and_optimizers(fill=2.0), {"data_pos": 2})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert load_checkpoint(tmp_path, *models_and_optimizers())["data_pos"] == 1
    path = save_checkpoint(tmp_path, 4, *models_and_optimizers(fill=2.0), {"data_pos": 2})
    assert latest_checkpoint(tmp_path) == path and sorted(p.name for p in tmp_path.glob("ckpt-*")) == [path.name]
    assert load_checkpoint(tmp_path, *models_and_optimizers())["data_pos"] == 2


def _save_forever(out_dir: str) -> None:
    """Child process: save checkpoints 1, 2, 3, ... whose weights all equal their step, until killed."""
    torch.set_num_threads(1)
    for step in range(1, 10**6):
        save_checkpoint(out_dir, step, *models_and_optimizers(fill=float(step)), {"data_pos": step})


def _latest_step(out_dir: Path) -> int:
    """The step `latest` names (0 before the first save), read while the child saves. latest_checkpoint reads
    the pointer, then the manifest it names: a save that moves the pointer and prunes the old checkpoint between
    the two reads (a reader descheduled on a loaded machine) is read again; a pointer that stays on an
    incomplete checkpoint still fails."""
    pointer = out_dir / checkpoint.POINTER
    while True:
        before = pointer.read_text() if pointer.is_file() else None
        try:
            path = latest_checkpoint(out_dir)
        except FileNotFoundError:
            if pointer.read_text() == before:
                raise
            continue
        return 0 if path is None else int(path.name.split("-")[1])


def test_sigkill_at_random_moments_of_saving_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL a process that does nothing but save, at 12 seeded random moments after its second save landed
    (however long saves take on a loaded machine); after each kill the latest checkpoint loads (checksums
    verified), its weights are those of the step it names, and it is no older than the last one seen.
    test_checkpoint.py crashes a save deterministically at each of its steps; this is the real signal."""
    rng, fork = random.Random(8), multiprocessing.get_context("fork")
    for kill in range(12):
        out_dir = tmp_path / f"run{kill}"
        child = fork.Process(target=_save_forever, args=(str(out_dir),))
        child.start()
        deadline = time.monotonic() + 300
        while _latest_step(out_dir) < 2 and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        seen = _latest_step(out_dir)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL and seen >= 2, (child.exitcode, seen)  # killed mid-run, not before
        models, opts = models_and_optimizers()
        state = load_checkpoint(out_dir, models, opts)
        assert all(torch.all(p == state["step"]) for m in models.values() for p in m.parameters())
        assert state["data_pos"] == state["step"] >= seen


# ------------------------------------------------------------------------------------------- grader
ADVERSARIAL_OUTPUTS = {  # model outputs that once took minutes to scan, and the answer extracted from each
    "80k chars of unclosed boxes": ("\\boxed{" * 12_000, None),
    "unclosed boxes, then one closed": ("\\boxed{" * 10_000 + "}", None),
    "100k chars of unclosed answer tags": ("<answer>" * 12_500, None),
    "5,000 nested braces": ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "{" * 5000 + "1" + "}" * 5000),
    "a 100k-digit answer": ("\\boxed{" + "9" * 100_000 + "}", "9" * 100_000),
}


@pytest.mark.parametrize("name", ADVERSARIAL_OUTPUTS)
def test_answer_extraction_is_linear_time_on_adversarial_outputs(name):
    text, expected = ADVERSARIAL_OUTPUTS[name]
    start = time.process_time()  # CPU time: busy neighbours on a loaded machine do not inflate it
    answer = extract_answer(text)
    assert time.process_time() - start < 1.0, f"{name}: extraction took {time.process_time() - start:.1f}s of CPU"
    assert answer == expected


def test_extraction_keeps_its_rules_on_mixed_boxes_and_tags():
    text = r"\boxed{1} \\boxed{\{2\}} <answer>a</answer> \boxed{} \boxed{x^{2}} \boxed{ <answer>b</answer> }{"
    assert extract_answer(text) == "<answer>b</answer>"  # the last closed, non-empty box (nested braces kept)
    assert extract_answer(text.replace(r"\boxed{ <answer>b</answer> }", "")) == "x^{2}"
    assert extract_answer("<answer>a</answer> <answer> b </answer> <answer>c") == "b"


def test_adversarial_answers_are_wrong_within_the_time_bound():
    grader, restart_s = started_grader()  # the worker starts outside the timed part; its start-up is measured
    # deeply nested (recursion in the parser), 100k characters, LaTeX that does not parse, and one right answer
    # (graded by a restarted worker if an adversarial one timed out: `timeout` does not include its start-up)
    answers = ["{" * 5000 + "1" + "}" * 5000, "9" * 100_000, r"\frac{1}{\sqrt[}{", r"\frac{2}{", "}{)(\\", "2"]
    bound = contract_bound(n_timeouts=5, timeout=1.0, restart_s=restart_s)  # at worst every wrong one times out
    verdicts, elapsed, hung = grade_in_thread(grader, answers, ["2"] * 6, timeout=1.0, wall_limit=bound + 60)
    grader.close()
    assert not hung, "grading adversarial answers hung"
    assert verdicts == [False, False, False, False, False, True]
    assert elapsed < bound, f"grading took {elapsed:.1f}s (start-up {restart_s:.1f}s): a timeout did not fire in time"


# ------------------------------------------------------------------------------------------- sampler
def test_the_sampler_never_runs_past_the_models_context(monkeypatch):
    """test_sampler.py covers an explicit max_len; here the default is capped by max_position_embeddings."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths (the kernels have their own tests)
    model = Qwen2(dataclasses.replace(TINY, max_position_embeddings=12))
    model.init_weights(torch.Generator().manual_seed(0))
    feedback = lambda rows, responses, stopped: [[1, 2, 3] for _ in rows]  # never solved  # noqa: E731
    rollout = generate(model, [[5, 6, 7], [4] * 9], feedback, SamplingOptions(max_new_tokens=4), max_turns=3,
                       stop_ids=[])
    assert rollout.lengths.tolist() == [12, 12]  # each row sampled up to the context, then stopped cleanly
    assert [len(spans) for spans in rollout.turn_spans] == [2, 1]
    with pytest.raises(ValueError, match="prompt 1 has 13 tokens, more than max_len=12"):
        generate(model, [[5], [4] * 13], feedback, SamplingOptions(max_new_tokens=4), max_turns=1, stop_ids=[])


# ------------------------------------------------------------------------------------------- config, log
@pytest.mark.parametrize("args, message", [
    (["--actor_lr=inf"], "actor_lr=inf must be a finite number >= 0"),  # Adam would write inf/NaN weights
    (["--critic_lr=-1e-5"], "critic_lr=-1e-05 must be a finite number >= 0"),
    (["--kl_coef=nan"], "kl_coef=nan is not a number"),
])
def test_config_mistakes_fail_before_any_work(args, message):
    """test_config.py covers unknown keys, wrong types and the other impossible combinations."""
    with pytest.raises(ValueError, match=message):
        parse_args(args)


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    """A power cut can leave log.jsonl's last line half-written; resuming drops it (it is past the checkpoint)."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "train", "st')
    JsonlLogger(log, resume_step=1).log({"kind": "train", "step": 2})
    assert [r["step"] for r in read_log(log)] == [1, 2]
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON line"):  # damage inside is not a torn tail
        JsonlLogger(log, resume_step=2)
