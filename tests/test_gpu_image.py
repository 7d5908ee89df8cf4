"""The GPU machines this project is lent have an image without `datasets` and `math_verify` (nothing can be
installed there but wheels carried in): everything the GPU path imports, and a training run on local files,
must work without them. Here both are blocked from import (sys.modules[name] = None makes `import name` fail
as a missing package does) in a fresh interpreter.

    python -m pytest -q tests/test_gpu_image.py
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = "import sys\nfor name in ('datasets', 'math_verify'):\n    sys.modules[name] = None\n"


def run_blocked(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=900, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                                 "PYTHONPATH": str(ROOT)})


def test_the_gpu_path_imports_without_datasets_and_math_verify():
    done = run_blocked("""
        sys.path[:0] = ['bench', 'tests']
        import nanoufo.trainer, nanoufo.rollout, nanoufo.evaluate, nanoufo.task, nanoufo.plan, nanoufo.prm
        import train_step, onpolicy, rollout, test_sampler  # the scripts bench/gpu_session.sh runs
        for name in ('datasets', 'math_verify'):
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f'{name} was not blocked')
        print('imported')
    """)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-3000:]


def test_a_short_run_on_local_files_trains_and_grades_without_them(tmp_path, hf_checkpoint):
    """train.py on a tiny checkpoint with the real vocabulary, a MetaMathQA .json and the bundled GSM8K .jsonl:
    the files are read without `datasets`, and grading says once on stderr that it compares spellings."""
    ckpt, _ = hf_checkpoint(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    train_file = tmp_path / "metamath.json"
    train_file.write_text(json.dumps([{"query": f"What is {i} + {i}?", "response": f"The answer is: {2 * i}",
                                       "type": "MATH_Rephrased"} for i in range(4)]))
    out = tmp_path / "run"
    done = run_blocked("import runpy; runpy.run_path('train.py', run_name='__main__')", "config/ufo_qwen2.5_3b.py",
                       f"--init_from={ckpt}", f"--train_data={train_file}", "--eval_data=gsm8k", f"--out_dir={out}",
                       "--dtype=float32", "--tp=1", "--max_steps=1", "--problems_per_step=2",
                       "--n_samples_per_problem=2", "--keep_groups=1", "--minibatch_size=2", "--max_new_tokens=3",
                       "--n_eval_problems=2", "--eval_k=2", "--micro_batch_tokens=0", "--grading=math_verify")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("math-verify is not installed") == 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1]
    assert sum(r["kind"] == "eval" for r in records) == 2 and records[-1]["eval/gsm8k/episodes"] == 2
