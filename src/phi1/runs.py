"""Runs that depend on runs: a finetune starts from the weights of the pretraining run of its sweep cell.

`init_from` (train.py) and `ckpt` (evaluate.py) take, besides a path or a hub id:
  run:<name>          the HF export of the finished run `<paths.output_dir>/<name>` (its `hf/`; the run's
                      folder given as a path stands for the same);
  run:<name>/<file>   a checkpoint of that run, `<name>/checkpoints/<file>` (e.g. phi-1-base, the 24,000-step
                      checkpoint of phi1_base: `run:phi1_base/base-step024000.ckpt`);
  wandb:<entity>/<project>/<artifact>:<alias>   a model artifact that a run logged to W&B
                      (`logger.wandb.log_model=true`), downloaded under `<paths.data_dir>/artifacts/`.

A run counts as finished once its `metrics.json` exists (train.py writes it last, after the HF export); a
checkpoint once it is whole (`phi1.checkpoints.is_checkpoint`: a file, which Lightning writes to a temporary
name first, or a DeepSpeed folder with its `latest` file, which is written last). In a sweep the cells
of one grid run in parallel: with `init_wait_min` > 0 a finetune waits for its base instead of failing.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import time
from pathlib import Path

from phi1.checkpoints import is_checkpoint
from phi1.config import ConfigError, in_multirun
from phi1.errors import MissingInputError, Phi1Error

log = logging.getLogger(__name__)


def _run_target(ref: str, output_dir: Path) -> tuple[str, Path, Path]:
    """`run:` reference -> (run name, the file or folder it names, the marker that says it is ready)."""
    name, _, file = ref.removeprefix("run:").partition("/")
    if not name:
        raise ConfigError(f"{ref!r}: expected run:<name> or run:<name>/<checkpoint file>")
    run_dir = output_dir / name
    if file:
        target = run_dir / "checkpoints" / file
        return name, target, target
    return name, run_dir / "hf", run_dir / "metrics.json"


def _other_names(name: str, output_dir: Path) -> str:
    """For a run that is not there at all: the runs under output_dir with a close name. One named as `name`
    without its seed is a run from before the scaling and mini runs carried `-s<seed>`: say how to rename it.
    For a run there, unfinished: the checkpoints it has, which `run:<name>/<file>` names."""
    if (output_dir / name).exists():
        ckpts = sorted((output_dir / name / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-3:]
        return (f" Its newest checkpoints: {', '.join(f'run:{name}/{p.name}' for p in reversed(ckpts))}."
                if ckpts else "")
    if not output_dir.is_dir():
        return ""
    unseeded = re.sub(r"-s\d+$", "", name)
    if unseeded != name and (output_dir / unseeded / "config.yaml").exists():
        return (f" {output_dir / unseeded} looks like it, from before run names carried the seed: if its"
                f" config.yaml has seed: {name.rsplit('-s', 1)[1]}, `mv {output_dir / unseeded} {output_dir / name}`.")
    close = difflib.get_close_matches(name, sorted(d.name for d in output_dir.iterdir() if d.is_dir()), n=3)
    return f" Runs with close names there: {', '.join(close)}." if close else ""


STARTED_BY = "overrides.yaml"


def record_start(run_dir: Path) -> None:
    """Keep the overrides of the launch that starts the run in run_dir (fresh, past every check) in
    `<run_dir>/overrides.yaml`: what a resume must repeat. Hydra keeps every launch's in `.hydra/<time>/`
    (conf/hydra/runs.yaml), launches refused before training and resumes among them."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if HydraConfig.initialized():  # not for train(cfg) called from Python
        # Every rank writes it: under a temporary name, renamed, so that ranks writing at once leave one whole file.
        tmp = Path(run_dir) / f"{STARTED_BY}.tmp-{os.getpid()}"
        OmegaConf.save(HydraConfig.get().overrides.task, tmp)
        tmp.replace(Path(run_dir) / STARTED_BY)


def multirun_hint(run_name: str) -> str:
    """For a refusal in a cell of a Hydra multirun: cells whose run_name does not follow the keys they vary
    (`-m seed=1,2 run_name=x`, `experiment=phi1 -m optim.lr=...`) share one folder, and the second met the
    first's checkpoints with advice to resume them."""
    if not in_multirun():
        return ""
    return (f" In a multirun each cell needs a run_name of its own, and run_name={run_name} is the same for every cell"
            " of this one unless it follows the keys they vary: leave it unset (the launch time and the job number),"
            " or derive it from them, e.g. 'run_name=mine-lr${optim.lr}-s${seed}'.")


def started_by(run_dir: Path) -> tuple[Path, list[str]] | None:
    """The overrides that started the run in run_dir, and their file (record_start); None where there are none."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / STARTED_BY
    return (path, list(OmegaConf.load(path))) if path.is_file() else None


def is_path(ref: str) -> bool:
    """A local path rather than a hub id ("org/name"): one that exists, starts with /, . or ~, or has more than
    one slash."""
    return Path(ref).expanduser().exists() or ref.startswith(("/", ".", "~")) or ref.count("/") > 1


def resolve(ref: str | None, output_dir: str | Path, data_dir: str | Path, wait_min: float = 0,
            poll_s: float = 30.0, what: str = "init_from") -> str | None:
    """The local path that `ref` names (see the module doc); any other value is returned as it is."""
    if not ref or not isinstance(ref, str):
        return ref
    if ref.startswith("wandb:"):
        return _download_artifact(ref.removeprefix("wandb:"), Path(data_dir) / "artifacts")
    if not ref.startswith("run:"):
        path = Path(ref).expanduser()
        _check_not_under_root(ref, path, Path(output_dir), what)
        if is_path(ref) and not path.exists():
            raise MissingInputError(f"{what}={ref}: no such file or folder")
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():  # a train.py run's folder
            return _run_folder(ref, path, what)
        return ref
    name, target, ready = _run_target(ref, Path(output_dir))
    deadline = time.monotonic() + 60 * wait_min
    announced = False
    while not is_checkpoint(ready):  # a file (metrics.json, a checkpoint), or a whole DeepSpeed folder
        if time.monotonic() >= deadline:
            raise MissingInputError(
                f"{what}={ref}: {ready} does not exist: run {name!r} has not finished (or not reached that"
                f" checkpoint) under {output_dir}. Run it first (its experiment config names the command)"
                + (", or set init_wait_min to wait for it (sweeps do)." if what == "init_from" else ".")
                + _other_names(name, Path(output_dir))
            )
        if not announced:
            log.info("%s=%s: waiting up to %.0f min for %s", what, ref, wait_min, ready)
            announced = True
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
    if not target.exists():
        raise MissingInputError(f"{what}={ref}: the run finished but {target} does not exist (export_hf=false?)")
    log.info("%s=%s -> %s", what, ref, target)
    return str(target)


def _check_not_under_root(ref: str, path: Path, output_dir: Path, what: str) -> None:
    """A relative path is read from the directory the command runs in. `ckpt=outputs/<run>` given where PHI1_ROOT
    (or paths.output_dir) puts the outputs elsewhere named nothing here, and was then looked up as a hub id
    "outputs/<run>": an error about the hub, with nothing to say the run is one folder away."""
    if path.is_absolute() or path.exists() or ref.startswith("~"):
        return
    there = (output_dir.parent / path).resolve()
    if not there.exists():
        return
    run = f" or {what}=run:{there.name}" if there.parent == output_dir.resolve() else ""
    raise MissingInputError(f"{what}={ref}: no such file or folder in {Path.cwd()}, the directory relative paths"
                            f" are read from; the outputs' root has it: {what}={there}{run}")


def _run_folder(ref: str, run_dir: Path, what: str) -> str:
    """A train.py run's folder stands for its model, as run:<name> does: its HF export (the checkpoint the run
    kept). Before, the folder was read as an HF folder and refused for having no tokenizer."""
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "hf" / "config.json").is_file():
        last = run_dir / "checkpoints" / "last.ckpt"
        raise MissingInputError(f"{what}={ref}: a train.py run folder without its HF export (hf/, written when the"
                                f" run finishes): give one of its checkpoints, e.g. {what}={last}")
    log.info("%s=%s: a run folder; its model is %s", what, ref, run_dir / "hf")
    return str(run_dir / "hf")


def weights_identity(path: str | None) -> list | None:
    """What tells the weights at a local path (a checkpoint file, DeepSpeed's folder, an HF folder) from others:
    each file's name, size and mtime, as sources.fingerprint does for data. A hash of the contents would cost
    minutes for phi-1-base's 17 GB checkpoint; an export written again with the same weights counts as changed.
    None for a hub id."""
    if not path or not Path(path).exists():
        return None
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [[str(p.relative_to(root)) if root.is_dir() else p.name, (st := p.stat()).st_size, st.st_mtime_ns]
            for p in files]


def built_on(run_dir: Path, output_dir: str | Path) -> list[Path]:
    """The finished runs under output_dir that trained on the same packed data as the run in run_dir, and those
    started from the weights of any of these: what a change to that data leaves stale with it."""
    def metrics(folder: Path) -> dict:
        try:
            return json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            return {}

    output_dir, run_dir = Path(output_dir).resolve(), Path(run_dir).resolve()
    finished = {d: metrics(d) for d in sorted(output_dir.iterdir()) if d.is_dir()} if output_dir.is_dir() else {}
    pack = metrics(run_dir).get("data/pack")
    same = [d for d, m in finished.items() if pack and m.get("data/pack") == pack and d != run_dir]
    roots = tuple(f"{d}{os.sep}" for d in (run_dir, *same))
    bases = {d: (m.get("init_from") or {}).get("path") for d, m in finished.items()}
    started = [d for d, base in bases.items() if base and str(Path(base).resolve()).startswith(roots)]
    return same + [d for d in started if d not in same]


def _download_artifact(path: str, root: Path) -> str:
    """A W&B model artifact -> the checkpoint file (or HF folder) inside it, downloaded once."""
    import wandb

    try:
        artifact = wandb.Api().artifact(path, type="model")
        local = Path(artifact.download(root=str(root / artifact.name.replace(":", "-"))))
    except wandb.errors.Error as e:  # no API key, no network, no such artifact: the user's to fix
        raise Phi1Error(f"wandb:{path}: {e}") from e
    ckpts = sorted(local.glob("*.ckpt"))
    if len(ckpts) == 1:
        return str(ckpts[0])
    if (local / "config.json").exists():
        return str(local)
    raise MissingInputError(f"wandb:{path}: expected one .ckpt file or an HF folder in the artifact, found "
                            f"{sorted(p.name for p in local.iterdir())}")
