"""The data of a train.py run: --dataset loaded and split, the training batches of each step, and the
held-out loss. Text is token blocks (qft_ds.textdata); instruction data is (input_ids, labels) examples
with the loss on the answers only (qft_ds.sftdata)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass
class Data:
    """--dataset ready to train on: token blocks [N, seq_len] (text) or (input_ids, labels) examples."""
    format: str  # "text", or sftdata's "prompt_completion" / "messages"
    train: object
    heldout: object
    pad_id: int
    summary: str
    heldout_desc: str = ""  # which part is held out, and how much of it the held-out loss reads (qft_ds.startup)


def load_data(args, tokenizer) -> Data:
    """Text: blocks (held-out: textdata's split). Instruction data: examples (held-out: sftdata.sft_splits)."""
    from qft_ds import sftdata, startup, textdata
    fmt = sftdata.dataset_format(args.dataset)
    if fmt == "text":
        if args.eval_dataset:
            sys.exit("--eval_dataset: only for instruction data (prompt/completion or messages rows)")
        splits = textdata.load_text_source(args.dataset)
        train = textdata.tokenize_blocks(tokenizer, splits.train, args.seq_len, split="train")
        held = textdata.tokenize_blocks(tokenizer, splits.heldout, args.seq_len, max_blocks=args.eval_blocks,
                                        split="held-out")
        return Data(fmt, train, held, tokenizer.pad_token_id,
                    f"{len(train)} train blocks x {args.seq_len} tokens, {len(held)} held-out blocks",
                    startup.text_heldout(splits, len(held), args.seq_len))
    train_rows, held_rows = sftdata.sft_splits(args.dataset, args.eval_dataset)
    train = sftdata.encode_sft(tokenizer, train_rows, args.seq_len, where=args.dataset)
    held = sftdata.encode_sft(tokenizer, held_rows, args.seq_len,
                              where=args.eval_dataset or f"{args.dataset} (held-out rows)")
    return Data(fmt, train, held, tokenizer.pad_token_id,
                f"{len(train)} train examples ({fmt}, up to {args.seq_len} tokens), {len(held)} held-out examples",
                startup.sft_heldout(args.dataset, args.eval_dataset, len(train_rows), len(held_rows), held))


def train_batches(data: Data, micro: int, seed: int, start_step: int, rank: int, world: int):
    """Yield (batch for engine(**batch), tokens that micro-step reads on all ranks: padding not counted)."""
    from qft_ds import sftdata, textdata
    if data.format == "text":
        for x in textdata.batches(data.train, micro, seed, start_step=start_step, rank=rank, world_size=world):
            yield {"input_ids": x, "labels": x}, micro * world * x.shape[1]
        return
    lengths = torch.tensor([len(ids) for ids, _ in data.train])
    mine = sftdata.sft_batches(data.train, micro, data.pad_id, seed, start_step=start_step, rank=rank,
                               world_size=world)
    every_rank = textdata.step_indices(len(data.train), micro * world, seed, start_step=start_step)
    for batch, idx in zip(mine, every_rank):
        yield batch, int(lengths[idx].sum())


@torch.no_grad()
def evaluate(engine, data: Data, batch_size: int) -> float:
    """Mean token loss over the held-out blocks; for instruction data, the mean loss per answer token."""
    from qft_ds import sftdata
    engine.eval()
    if data.format == "text":
        blocks, total, count = data.heldout, 0.0, 0
        for i in range(0, len(blocks), batch_size):
            x = blocks[i:i + batch_size].to(engine.device)
            total += engine(input_ids=x, labels=x).loss.float().item() * len(x)
            count += len(x)
        loss = total / count
    else:
        loss = sftdata.mean_answer_loss(engine, data.heldout, batch_size, data.pad_id)
    engine.train()
    return loss
