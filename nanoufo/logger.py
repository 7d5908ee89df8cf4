"""Run logging: one JSON object per line in out_dir/log.jsonl, and a PNG plot of the curves; with
log_to=jsonl,tensorboard the same metrics as TensorBoard event files (out_dir/tensorboard), with wandb in Weights
& Biases (offline with WANDB_MODE=offline).

    python -m nanoufo.logger out/demo/log.jsonl            # writes out/demo/log.png
    python -m nanoufo.logger out/demo/log.jsonl -o curves.png
    tensorboard --logdir out/ufo_qwen2.5_3b/tensorboard

Training steps are lines with "kind": "train" (TensorBoard tags train/<key>); evaluations on the held-out
split are "kind": "eval" (tags eval/<set>/<key>, as in the JSON lines).
Tests: python -m pytest -q tests/test_reliability.py tests/test_train_cli.py tests/test_logger.py
"""
import argparse
import json
import math
from pathlib import Path

FAILURES = ("no_answer_rate", "repeat_rate", "invalid_rate")  # drawn in one panel, "failure modes"
TRAIN_PANELS = ("reward", "succ_at_k", FAILURES, "mean_turns", "non_repetitive_ratio", "kl_ref", "pg/clip_frac",
                "pg/entropy", "grad_norm/actor", "lr/actor", "value_loss", "logp_diff_sampler", "tokens_per_s")
EVAL_PANELS = ("succ_at_k", "pass_at_k", FAILURES, "non_repetitive_ratio")  # per eval set, of eval/<set>/<key>


class JsonlLogger:
    """Appends records to a JSON-lines file; on resume, records past the checkpoint's step are dropped
    so that the file reads as if the run had never stopped."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_log(self.path, drop_torn_tail=True) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


class RunLogger:
    """A run's metrics to every sink of `log_to` ("jsonl", "tensorboard", "wandb", comma-separated; JSON lines
    always). On resume, each sink drops or overwrites what was logged past the checkpoint's step."""

    def __init__(self, out_dir: str | Path, log_to: str = "jsonl", resume_step: int | None = None,
                 config: dict | None = None, wandb_project: str = "nanoufo"):
        out_dir, sinks = Path(out_dir), log_to.split(",")
        self.jsonl = JsonlLogger(out_dir / "log.jsonl", resume_step)
        self.tensorboard = self.wandb = None
        if "tensorboard" in sinks:
            self.tensorboard = _needs("tensorboard", "torch.utils.tensorboard").SummaryWriter(
                str(out_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in sinks:
            self.wandb = _needs("wandb").init(project=wandb_project, dir=str(out_dir), config=config,
                                              id=_wandb_run_id(out_dir), resume="allow")

    def log(self, record: dict) -> None:
        self.jsonl.log(record)
        scalars = {key: float(v) for key, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step"}
        tags = {key if key.startswith("eval/") else f"{record.get('kind', 'train')}/{key}": v
                for key, v in scalars.items()}
        if self.tensorboard is not None:
            for tag, value in tags.items():
                self.tensorboard.add_scalar(tag, value, record["step"])
            self.tensorboard.flush()  # a run killed later keeps what it logged
        if self.wandb is not None:
            self.wandb.log(tags, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_sinks(log_to: str) -> None:
    """ValueError naming the package a sink of log_to needs and is not installed (before any work starts)."""
    import importlib.util
    for sink in log_to.split(","):
        if sink in ("tensorboard", "wandb") and importlib.util.find_spec(sink) is None:
            raise ValueError(f"config: log_to={sink} needs the {sink} package (pip install {sink})")


def _needs(package: str, module: str | None = None):
    """The module that a log sink needs; ValueError naming the package when it is not installed."""
    import importlib
    try:
        return importlib.import_module(module or package)
    except ImportError:
        raise ValueError(f"config: log_to={package} needs the {package} package (pip install {package})") from None


def _wandb_run_id(out_dir: Path) -> str:
    """One W&B run per out_dir: the id kept in out_dir/wandb_run_id, so a resumed run continues it."""
    path = out_dir / "wandb_run_id"
    if not path.is_file():
        import uuid
        path.write_text(uuid.uuid4().hex[:12] + "\n")
    return path.read_text().strip()


def read_log(path: str | Path, drop_torn_tail: bool = False) -> list[dict]:
    """The records of a log; with drop_torn_tail, an unparsable last line (a write cut short by a crash or a
    power loss) is dropped instead of raising."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: log file not found")
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if drop_torn_tail and i == len(lines):
                    break
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return records


def plot_log(log_path: str | Path, png_path: str | Path | None = None) -> Path:
    """Plot every known curve present in the log, one panel each (the failure modes share one); evaluations
    with a spread over evaluation seeds (<key>_sd) get error bars. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    png_path = Path(png_path or Path(log_path).with_suffix(".png"))
    sets = sorted({key.split("/")[1] for r in records if r.get("kind") == "eval" for key in r if key.count("/") == 2})
    panels = [("train", *_panel(p, "")) for p in TRAIN_PANELS]
    panels += [("eval", *_panel(p, f"eval/{name}/")) for name in sets for p in EVAL_PANELS]
    present = [(kind, title, keys) for kind, title, keys in panels
               if any(r.get("kind") == kind and r.get(k) is not None for r in records for k in keys)]
    cols = 4
    rows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, (kind, title, keys) in zip(axes.flat, present):
        for key in keys:
            points = [(r["step"], r[key], r.get(f"{key}_sd") or 0.0) for r in records
                      if r.get("kind") == kind and r.get(key) is not None]
            if points:
                steps, values, spreads = zip(*points)
                ax.errorbar(steps, values, yerr=spreads if kind == "eval" else None,
                            marker="o" if kind == "eval" else None, markersize=3, capsize=2,
                            label=key.rsplit("/", 1)[-1].removesuffix("_rate"))
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _panel(panel: str | tuple[str, ...], prefix: str) -> tuple[str, tuple[str, ...]]:
    """(title, log keys) of a panel: one key, or the failure modes (shares of episodes) together."""
    if isinstance(panel, str):
        return prefix + panel, (prefix + panel,)
    return f"{prefix}failure modes (episodes)", tuple(prefix + key for key in panel)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot a nanoufo log.jsonl")
    parser.add_argument("log", help="path to log.jsonl")
    parser.add_argument("-o", "--out", default=None, help="PNG path (default: next to the log)")
    args = parser.parse_args()
    print(plot_log(args.log, args.out))
