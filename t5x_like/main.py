"""One entry point: `python -m t5x_like.main MODE [--gin_file=F ...] [--gin.NAME=VALUE ...] [--flag=value]`.

Modes:
  train      train (or resume) the run the gin files describe (gin/runs/pretrain.gin, finetune.gin)
  eval       validation perplexity of a checkpoint (gin/runs/eval.gin)
  plot       --run_dir=DIR (repeatable) --output=PNG: loss and perplexity curves of runs
  demo       build each model family from gin, count parameters, run a forward pass
  import_hf  --hf_dir=DIR --output_dir=DIR [--peft_dir=DIR]: convert a Hugging Face checkpoint
             (safetensors) into an Orbax checkpoint plus a gin file that rebuilds the architecture;
             with --peft_dir, with that folder's LoRA adapters (peft format) on top
  export_peft --run_dir=DIR --output_dir=DIR: the LoRA adapters of a run's latest checkpoint in peft's
             format (adapter_config.json + adapter_model.safetensors): an adapter-only checkpoint
  quantize   --run_dir=DIR --output_dir=DIR --scheme=int8|int4|nf4 [--keep_float_embeddings]
             [--quantized_matmul=int8]: a run's (or an import's) latest params with weight-only quantized dense
             kernels, embedding tables and output projection, saved as such, plus OUT/model.gin for
             eval/infer/score (int8: layers multiply int8 activations by the codes instead of dequantizing)
  infer      --input=FILE|- [--output=FILE.jsonl]: decode prompts (text lines or JSONL) with a checkpoint
             (gin/runs/infer.gin: greedy, sampling or beam search with a KV cache); JSONL out
  score      --input=FILE|- [--output=FILE.jsonl]: log-likelihood of (input, target) pairs (JSONL records
             or input<TAB>target lines) under a checkpoint (gin/runs/score.gin); JSONL out
  infer_eval generate-and-score evaluation of a checkpoint (gin/runs/infer_eval.gin): decode a seqio task's
             split, score it with the task's metric_fns; predictions JSONL and metrics in --output_dir
  precompile ahead-of-time compile the train step for a model on a mesh of NUM_FAKE_DEVICES fake CPU
             devices with abstract arrays (gin/runs/precompile.gin); print per-device memory and FLOPs
  rl         RLHF with on-policy sampling, GRPO or PPO (gin/runs/grpo.gin, ppo.gin; inference/rlhf.py)
  sweep      --spec=configs/NAME.yaml [--storage=URL] [--sweep_dir=DIR] [--report_only]: run one worker of
             an Optuna hyperparameter sweep (every trial a training run), then write results.csv/.md and
             plots into the sweep directory; start the same command on more hosts to share the study

Multi-host: run one program per host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or T5X_LIKE_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID); see runtime/distributed.py.

A user error prints one line `error: ...` and exits with status 2; no traceback. Anything else is a
bug: its traceback, then a line asking to report it, exit status 1. --verbose shows the TensorFlow,
absl and CUDA start-up logging that is otherwise hidden.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys

from t5x_like.errors import UserError
from t5x_like.runtime import quiet_startup

MODES = ("train", "eval", "plot", "demo", "import_hf", "export_peft", "quantize", "precompile", "infer", "score",
         "infer_eval", "sweep", "rl")


class UsageError(UserError):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line `error: ...` (exit 2) as every user error, not usage + error
        raise UsageError(f"{message}; see python -m t5x_like.main --help")


def parse_args(argv):
    parser = _ArgumentParser(prog="python -m t5x_like.main", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow / absl / CUDA start-up logging and library shutdown noise")
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--hf_dir", help="import_hf: folder written by transformers' save_pretrained")
    parser.add_argument("--peft_dir", help="import_hf: LoRA adapters in peft's format to add to the import")
    parser.add_argument("--output_dir", help="import_hf: where the checkpoint and model.gin go; infer_eval: where "
                        "predictions and metrics go (the OUTPUT_DIR macro)")
    parser.add_argument("--run_dir", action="append", default=[], help="plot: a run's MODEL_DIR (repeatable)")
    parser.add_argument("--scheme", help="quantize: int8, int4 or nf4 (layers/quantization.py)")
    parser.add_argument("--keep_float_embeddings", action="store_true",
                        help="quantize: keep the embedding tables and the output projection float (as QLoRA)")
    parser.add_argument("--quantized_matmul", default="dequantize",
                        help="quantize: dequantize (weight-only, the default) or int8 (int8/int4 weights times "
                        "dynamic int8 activations, layers/quantized_matmul.py)")
    parser.add_argument("--output", help="plot: the PNG to write; infer/score: the JSONL to write (default stdout)")
    parser.add_argument("--input", help="infer/score: prompts or pairs, text or JSONL ('-' = stdin)")
    parser.add_argument("--spec", help="sweep: the YAML sweep specification (configs/README.md)")
    parser.add_argument("--storage", help="sweep: Optuna storage URL (default: SQLite in the sweep directory)")
    parser.add_argument("--sweep_dir", help="sweep: where trials and results go (default from the spec)")
    parser.add_argument("--report_only", action="store_true", help="sweep: only rewrite the results and plots")
    parser.add_argument("--coordinator_address", help="multi-host: process 0's HOST:PORT")
    parser.add_argument("--num_processes", type=int, help="multi-host: number of processes (hosts)")
    parser.add_argument("--process_id", type=int, help="multi-host: this process' index, 0..N-1")
    args, rest = parser.parse_known_args(argv)
    bindings = []
    for item in rest:
        if item.startswith("--gin.") and "=" in item:
            name, value = item[len("--gin."):].split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            raise UsageError(f"unknown argument {item!r}; use --gin_file=F, --gin.NAME=VALUE or a mode flag")
    return args, bindings


def import_hf(hf_dir: str, output_dir: str, peft_dir: str = None) -> None:
    from t5x_like import gin_config
    from t5x_like.interop import hf
    from t5x_like.training import checkpointing

    if not hf_dir or not output_dir:
        raise UsageError("import_hf needs --hf_dir=DIR (a save_pretrained folder) and --output_dir=DIR")
    ckpt_dir = checkpointing.checkpoints_dir(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir={output_dir} is a file; choose an empty or new folder")
    if os.path.exists(ckpt_dir) and (not os.path.isdir(ckpt_dir) or os.listdir(ckpt_dir)):
        raise UsageError(f"{ckpt_dir} already holds checkpoints; choose an empty --output_dir")
    model, variables = hf.load(hf_dir)
    if peft_dir:
        from t5x_like.interop import peft
        params, lora_config = peft.load_adapters(peft_dir, model, variables["params"])
        model, variables = type(model)(model.config, lora=lora_config), {**variables, "params": params}
    step_dir = checkpointing.save_params(ckpt_dir, 0, variables["params"])
    gin_file = os.path.join(output_dir, "model.gin")
    with open(gin_file, "w") as f:
        f.write(gin_config.model_gin_text(model, f"Imported from Hugging Face checkpoint {os.path.abspath(hf_dir)}"))
    print(f"{type(model).__name__}: {model.num_params(variables):,} params")
    print(f"checkpoint: {step_dir}\ngin file:   {gin_file}")
    # The tokenizer infer/score/eval read (VOCABULARY = a file, or the output folder: tokenizer.json first).
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json",
                       "special_tokens_map.json", "chat_template.jinja")  # the last: hf:<OUT> chat template
    copied = [name for name in tokenizer_files if os.path.isfile(os.path.join(hf_dir, name))]
    for name in copied:
        shutil.copy(os.path.join(hf_dir, name), os.path.join(output_dir, name))
    if set(copied) & set(tokenizer_files[:3]):
        print(f"tokenizer:  {', '.join(copied)} in {output_dir} (--gin.VOCABULARY=\"'{output_dir}'\")")


def export_peft(run_dir: str, output_dir: str) -> None:
    """Write the LoRA adapters of `run_dir`'s latest checkpoint (the model its config.gin, or an
    import's model.gin, builds)."""
    from t5x_like import gin_config
    from t5x_like.interop import peft
    from t5x_like.training import checkpointing

    if not run_dir or not output_dir:
        raise UsageError("export_peft needs --run_dir=DIR (a training run with LoRA) and --output_dir=DIR")
    config = next((os.path.join(run_dir, n) for n in ("config.gin", "model.gin")
                   if os.path.isfile(os.path.join(run_dir, n))), None)
    if config is None:
        raise UsageError(f"--run_dir={run_dir} has no config.gin or model.gin; pass the MODEL_DIR of a training "
                         "run (or an import_hf folder)")
    gin_config.parse([config], [])
    model = gin_config.model_from_gin()
    if model.lora is None:
        raise UsageError(f"the model of {run_dir} has no LoRA adapters (its gin config binds no lora)")
    params = checkpointing.restore_model_params(run_dir, model)
    peft.save_adapters(output_dir, model, params, model.lora)
    print(f"peft adapters: {output_dir}")


def quantize(run_dirs, output_dir: str, scheme: str, keep_float_embeddings: bool = False,
             matmul: str = "dequantize") -> None:
    """The `quantize` mode: inference/quantize.py does the work."""
    if len(run_dirs) != 1 or not output_dir or not scheme:
        raise UsageError("quantize needs one --run_dir=DIR (a training run or import), --output_dir=DIR and "
                         "--scheme=int8|int4|nf4")
    from t5x_like.inference.quantize import quantize_checkpoint

    out = quantize_checkpoint(run_dirs[0], output_dir, scheme, embeddings=not keep_float_embeddings, matmul=matmul)
    (total, total_q), (replaced, replaced_q) = out["bytes"]["total"], out["bytes"]["quantized"]
    rest = "norms, small kernels" + (", embeddings, logits_dense" if keep_float_embeddings else "")
    print(f"{scheme}: params {total:,} -> {total_q:,} bytes ({total_q / total:.1%}); quantized {replaced:,} -> "
          f"{replaced_q:,} bytes; not quantized ({rest}): {total - replaced:,} bytes")
    print(f"checkpoint: {out['checkpoint']} (step {out['step']})\ngin file:   {out['gin_file']}")


def run_gin_mode(mode: str, gin_files, bindings) -> None:
    import gin

    from t5x_like import gin_config

    if not gin_files:
        raise UsageError(f"{mode} needs gin files, e.g. --gin_file=models/t5_1_1_tiny.gin "
                         f"--gin_file=runs/{'pretrain' if mode == 'train' else 'eval'}.gin")
    from t5x_like.training import trainer

    gin_config.parse(gin_files, bindings)
    gin_config.check_required_macros()
    model = gin_config.model_from_gin()
    text = gin.config_str()
    run = trainer.train if mode == "train" else trainer.evaluate
    results = run(model=model, gin_config_text=text)
    for task, values in results.items():
        print(f"validation {task}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))


def run_inference_mode(mode: str, gin_files, bindings, input_path, output_path) -> None:
    from t5x_like import gin_config, inference

    if not input_path:
        raise UsageError(f"{mode} needs --input=FILE (text or JSONL; '-' reads stdin)")
    if input_path != "-" and not os.path.isfile(input_path):
        what = "is a directory" if os.path.isdir(input_path) else "does not exist"
        raise UsageError(f"--input={input_path} {what}; give a text or JSONL file ('-' reads stdin)")
    out_dir = os.path.dirname(os.path.abspath(output_path)) if output_path not in (None, "-") else None
    if out_dir and not os.path.isdir(out_dir):
        raise UsageError(f"--output={output_path}: the folder {out_dir} does not exist")
    if not gin_files:
        raise UsageError(f"{mode} needs gin files, e.g. --gin_file=CHECKPOINT/model.gin --gin_file=runs/{mode}.gin")
    gin_config.parse(gin_files, bindings)
    gin_config.check_required_macros()
    model = gin_config.model_from_gin()
    count = (inference.infer if mode == "infer" else inference.score)(input_path, output_path, model=model)
    print(f"{mode}: {count} records -> {output_path or 'stdout'}", file=sys.stderr)


def run_infer_eval_mode(gin_files, bindings, output_dir) -> None:
    import gin

    from t5x_like import gin_config, inference

    if not gin_files:
        raise UsageError("infer_eval needs gin files, e.g. --gin_file=runs/infer_eval.gin "
                         "--gin_file=CHECKPOINT/model.gin")
    if output_dir:
        bindings = [*bindings, f"OUTPUT_DIR = {os.path.abspath(output_dir)!r}"]
    gin_config.parse(gin_files, bindings)
    gin_config.check_required_macros()
    model = gin_config.model_from_gin()
    results = inference.infer_eval(model=model, gin_config_text=gin.config_str())
    for task, values in results.items():
        print(f"infer_eval {task}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))


def run_rl_mode(gin_files, bindings) -> None:
    import gin

    from t5x_like import gin_config
    from t5x_like.inference import rlhf

    if not gin_files:
        raise UsageError("rl needs gin files, e.g. --gin_file=RUN/config.gin --gin_file=runs/grpo.gin")
    gin_config.parse(gin_files, bindings)
    gin_config.check_required_macros()
    results = rlhf.rl_train(model=gin_config.model_from_gin(), gin_config_text=gin.config_str())
    for split, values in results.items():
        print(f"rl {split}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))


# OSErrors about a path the user named: one line naming the path, not a traceback.
PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)
# OSErrors of the environment the user can fix (disk full, quota, read-only file system).
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

BUG_LINE = ("t5x_like: this is a bug in t5x_like, not a problem with your input: please report it with the "
            "traceback above and the command line")


def is_user_error(exc: BaseException) -> bool:
    """Errors the user caused and can fix (printed as one line), as opposed to bugs (tracebacks).
    gin re-raises a configurable's exception as a subclass instance, so isinstance still holds."""
    from t5x_like.errors import unwrap_gin

    exc = unwrap_gin(exc)
    return isinstance(exc, (UserError, *PATH_ERRORS)) or (
        isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS)


def report_error(exc: BaseException) -> int:
    """Print a user error as one line (exit status 2), or a bug as its traceback plus a line
    saying it is a bug to report (exit status 1)."""
    import traceback

    from t5x_like.errors import user_message

    if is_user_error(exc):
        print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
        return 2
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(BUG_LINE, file=sys.stderr, flush=True)
    return 1


def run_mode(args, bindings) -> None:
    if args.mode in ("train", "eval"):
        from t5x_like.runtime import distributed  # before anything asks JAX for devices
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        run_gin_mode(args.mode, args.gin_file, bindings)
    elif args.mode == "plot":
        from t5x_like.training.plotting import plot_runs
        if not args.run_dir or not args.output:
            raise UsageError("plot needs --run_dir=DIR (one or more) and --output=FILE.png")
        print(plot_runs(args.run_dir, args.output))
    elif args.mode == "demo":
        from t5x_like import demo
        demo.run(args.gin_file, bindings)
    elif args.mode == "import_hf":
        import_hf(args.hf_dir, args.output_dir, args.peft_dir)
    elif args.mode == "export_peft":
        if len(args.run_dir) > 1:
            raise UsageError("export_peft takes one --run_dir")
        export_peft(args.run_dir[0] if args.run_dir else None, args.output_dir)
    elif args.mode == "quantize":
        quantize(args.run_dir, args.output_dir, args.scheme, args.keep_float_embeddings, args.quantized_matmul)
    elif args.mode in ("infer", "score"):
        run_inference_mode(args.mode, args.gin_file, bindings, args.input, args.output)
    elif args.mode == "infer_eval":
        run_infer_eval_mode(args.gin_file, bindings, args.output_dir)
    elif args.mode == "precompile":
        from t5x_like.training import precompile
        precompile.run(args.gin_file, bindings)
    elif args.mode == "rl":
        run_rl_mode(args.gin_file, bindings)
    elif args.mode == "sweep":
        from t5x_like import sweep
        if not args.spec:
            raise UsageError("sweep needs --spec=FILE.yaml, e.g. --spec=configs/tiny_sweep.yaml")
        print(sweep.run(args.spec, args.storage, args.sweep_dir, bindings, report_only=args.report_only))


def main(argv=None) -> int:
    """Run one mode; returns the exit status: 0, 2 for a user error (one line `error: ...`), 1 for
    a bug (traceback), 3 when a peer process of a multi-host run died."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        quiet_startup.quiet_startup(verbose="--verbose" in argv)
        args, bindings = parse_args(argv)
        run_mode(args, bindings)
    except Exception as e:  # noqa: BLE001 (every exception is reported: one line or a traceback)
        trainer = sys.modules.get("t5x_like.training.trainer")  # only a train can have been interrupted
        if trainer is not None and isinstance(e, trainer.TrainingInterrupted):
            from t5x_like.errors import user_message
            print(f"stopped: {user_message(e)}", file=sys.stderr)
            return 0
        if not is_user_error(e):
            from t5x_like.runtime import distributed
            message = distributed.peer_failure_message(e)
            if message is not None:
                distributed.exit_after_peer_failure(message)
        return report_error(e)
    return 0


if __name__ == "__main__":
    from t5x_like.runtime.host_runtime import reexec_with_tuned_allocator
    reexec_with_tuned_allocator()  # before JAX starts: see runtime/host_runtime.py
    status = main()
    if status != 0 and "--verbose" not in sys.argv[1:]:
        quiet_startup.exit_quietly(status)
    sys.exit(status)
