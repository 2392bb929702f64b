"""Fine-tune with QFT through the Hugging Face Trainer: `import qft_ds` and a DeepSpeed config.

    python examples/hf_trainer.py --model PATH_OR_ID --text my.txt --output_dir runs/hf
    deepspeed --num_gpus 2 examples/hf_trainer.py --model ... --text ...

ds_configs/qft_hf.json leaves batch size, accumulation, clipping, lr, weight decay and bf16 as "auto", so
TrainingArguments decides them; it has no "scheduler" section, so Trainer's own lr_scheduler_type and
warmup apply. QFTLion's betas stay (0.9, 0.99) (Trainer's adam_beta2 would be 0.999: not for Lion).
`trainer.save_model(DIR)` (and `model.save_pretrained`) writes a plain HF folder: dense weights that
`AutoModelForCausalLM.from_pretrained` loads without qft_ds. Trainer's resumable checkpoints go through
DeepSpeed's (pickle) format; this script also saves a qft_ds checkpoint at the end (resume it with train.py's
tools, or `qft_ds export OUTPUT_DIR OUT`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import qft_ds  # noqa: F401  (routes Trainer's deepspeed.initialize to qft_ds: int8 weights, QFTLion)
from qft_ds import checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Blocks(torch.utils.data.Dataset):
    """Fixed-length token blocks of a text file, as {input_ids, labels}."""

    def __init__(self, tokenizer, text: str, seq_len: int):
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        n = ids.numel() // seq_len
        if n < 1:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than one block of {seq_len}")
        self.blocks = ids[: n * seq_len].view(n, seq_len)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main(argv=None) -> Trainer:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="a .txt file to train on")
    p.add_argument("--output_dir", default="runs/hf_trainer")
    p.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "qft_hf.json"))
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = Blocks(tok, Path(args.text).read_text(), args.seq_len)
    targs = TrainingArguments(output_dir=args.output_dir, deepspeed=args.deepspeed, max_steps=args.max_steps,
                              learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                              lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10),
                              weight_decay=0.1, bf16=args.bf16, logging_steps=1, save_strategy="no",
                              report_to=[])
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    engine = trainer.model_wrapped  # the DeepSpeed engine; its optimizer is QFTLion
    checkpoint.save(args.output_dir, engine, engine.optimizer, step=trainer.state.global_step,
                    ds_config=None, tokenizer=tok)
    return trainer


if __name__ == "__main__":
    main()
