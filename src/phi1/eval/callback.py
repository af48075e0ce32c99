"""Evaluation inside training: after the last step, and every N steps (finetuning: at each checkpoint, the best
one kept, as the paper's protocol, §2.3).

Without `allow_code_execution` only the solution NLL is computed (no code runs); with it, completions are
generated from the model being trained and executed in the sandbox, which is started at fit start so that a
sandbox that cannot run stops the job before training, not after it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


class Evaluation(Callback):
    def __init__(self, cfg, run_dir: Path):
        from phi1.evaluate import load_benchmarks

        self.cfg = cfg
        # Loaded here, before the data is packed and the model built: a benchmark that cannot load (a path
        # mistyped, MBPP from the hub without network) stops the job now, not at its first evaluation.
        self.problems = load_benchmarks(cfg.benchmarks)
        if graded := [name for name, spec in cfg.benchmarks.items() if spec.get("grade")]:
            # Training has no grader (no `llm`): an LLM grade per evaluation would also pay for each checkpoint.
            log.info("evaluation: %s scored by execution only; its LLM grade (paper §4) is evaluate.py's: python "
                     "evaluate.py ckpt=%s benchmark=%s llm=gpt4 allow_code_execution=true", ", ".join(graded),
                     Path(run_dir) / "hf", graded[0])
        self.run_dir = Path(run_dir)
        self.sandbox = None
        self.history: list[dict] = []
        self.best: dict | None = None
        self._last_step = -1

    # Saved in every checkpoint, so that a resumed run (a preempted finetune) keeps its history and, above all,
    # its best score: without it the first evaluation after a resume would replace best.ckpt whatever its score.
    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self._last_step = state["history"], state["best"], state["last_step"]

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.ckpt"

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.cfg.allow_code_execution:
            from phi1.evaluate import make_sandbox

            log.warning("evaluation.allow_code_execution=true: running model-written code in the sandbox")
            self.sandbox = make_sandbox(self.cfg.sandbox)
        elif trainer.is_global_zero:
            log.info("evaluation: solution NLL only (pass@k needs evaluation.allow_code_execution=true)")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        every = self.cfg.every_n_steps
        if every and trainer.global_step % every == 0 and not trainer.fit_loop._should_accumulate():
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module)
        kept = self.kept_evaluation()
        if kept and trainer.is_global_zero:  # W&B's run table shows the summary: the kept checkpoint's numbers
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update({**kept, "eval/best_step": self.best["step"]})

    def kept_evaluation(self) -> dict | None:
        """The metrics of the checkpoint kept by `keep_best`, when it is not the last one evaluated."""
        if not self.best or not self.history or self.history[-1]["step"] == self.best["step"]:
            return None
        kept = [e for e in self.history if e["step"] == self.best["step"]]
        return {k: v for k, v in kept[-1].items() if k != "step"} if kept else None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Here rather than in on_train_end, which a run resumed after its final step never reaches.
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A fit that raises (a non-finite loss, SIGTERM's exit) skips the teardown hooks: the sandbox's workers
        # would live on in this process, through the next jobs of a multirun.
        self.teardown(trainer, pl_module, "fit")

    def _ranks(self, trainer):
        """Every rank of a multi-device run generates for a share of the problems, and rank 0 scores them: on
        a node of 8, rank 0 alone would take 8 times as long while the other 7 wait at a collective (whose
        timeout, 30 min by default, a sampled evaluation could pass)."""
        from phi1.evaluate import Ranks

        if trainer.world_size == 1:
            return None

        def gather(obj):
            shares = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(obj, shares, dst=0)
            return shares

        return Ranks(trainer.global_rank, trainer.world_size, gather, execute=self.cfg.allow_code_execution)

    def _evaluate(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        from phi1.evaluate import evaluate_model, wandb_tables

        model = pl_module.model
        training = model.training
        model.eval()
        out_dir = self.run_dir / "eval" / f"step{step:06d}"
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            metrics, tables = evaluate_model(
                model, trainer.datamodule.tokenizer, self.cfg.benchmarks, self.problems, self.cfg.generation,
                self.sandbox, self.cfg.ks, out_dir, self.cfg.solution_nll, ranks=self._ranks(trainer),
                nll_context=self.cfg.nll_context,
            )
        model.train(training)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                if isinstance(logger, WandbLogger):
                    for key, (columns, data) in wandb_tables(tables, out_dir).items():
                        logger.log_table(key, columns=columns, data=data, step=step)
            self.history.append({"step": step, **metrics})
            (self.run_dir / "eval").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "eval" / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        # Every rank takes part in saving (DeepSpeed's save is collective), so rank 0's verdict is broadcast.
        key = self.cfg.keep_best
        better = key in metrics and (self.best is None or metrics[key] > self.best[key])
        if key and trainer.strategy.broadcast(better):
            trainer.save_checkpoint(self.best_path)
            self.best = {"step": step, key: metrics[key]} if metrics else {"step": step}
            if trainer.is_global_zero:
                log.info("best so far by %s: step %d (%s)", key, step, metrics[key])
        trainer.strategy.barrier()
