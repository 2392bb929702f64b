"""Fine-tune with QFT in a plain accelerate loop, DeepSpeed plugin pointing at ds_configs/qft_hf.json:

    accelerate launch --num_processes 1 --use_deepspeed --deepspeed_config_file ds_configs/qft_hf.json \\
        examples/accelerate_qft.py --model PATH_OR_ID --text my.txt

(`--num_processes`: one per GPU; without it accelerate fails on a CPU machine with a bare AssertionError.
Or pass --deepspeed_config here to build the plugin in-process, as the CPU test does.) `import qft_ds`
routes accelerate's `deepspeed.initialize` to qft_ds. The config's "optimizer" section makes accelerate
want a DummyOptim, whose lr and weight decay fill the "auto" values; accelerate fills the micro-batch
size from the dataloader and clipping from the plugin.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DummyOptim
from transformers import AutoModelForCausalLM, AutoTokenizer

import qft_ds  # noqa: F401  (routes deepspeed.initialize to qft_ds)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_trainer import Blocks  # noqa: E402


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--deepspeed_config", default=None, help="build the DeepSpeed plugin here (else: the launcher's)")
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    args = p.parse_args(argv)

    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_config, gradient_clipping=1.0) if args.deepspeed_config \
        else None
    accelerator = Accelerator(deepspeed_plugin=plugin)  # not cpu=True: accelerate then ignores DeepSpeed
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = Blocks(tok, Path(args.text).read_text(), args.seq_len)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = DummyOptim(model.parameters(), lr=args.lr, weight_decay=0.1)  # QFTLion comes from the config
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses, step = [], 0
    while step < args.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)  # engine.backward + engine.step (the int8 update)
            optimizer.step()            # no-ops under DeepSpeed; kept for a portable loop
            optimizer.zero_grad()
            losses.append(loss.item())
            accelerator.print(f"step {step + 1}: loss {losses[-1]:.4f}")
            step += 1
            if step == args.max_steps:
                break
    return losses


if __name__ == "__main__":
    main()
