"""train.py at ZeRO stage 3 on 2 gloo ranks as a user runs it, with the held-out loss measured before,
during (--eval_every 1) and after training, two evaluation batches each time, and clipping's norm-only
backward at step 1: the gather prefetch never misses its traced order (no warning) with a tied or an
untied embedding/head, and the tied run ends with the bits of the same run gathering at each use.

A tied head is the case that missed: its weight is the trace's first use and also the forward's last and
the backward's first, so an evaluation batch followed by another forward read as forward then backward."""
import json
import logging

import pytest

import harness as H
import test_zero_train as T

RUNS = (("tied", 2), ("tied", 0), ("untied", 2))  # (head, prefetch depth; 0: each weight gathered at its use)
EVAL = ("--eval_every", "1", "--eval_blocks", "4")  # micro-batch 2: two evaluation forwards each time


def _worker(rank, world, cfg, text, tmp):
    from pathlib import Path

    from qft_ds.zero import prefetch
    tmp = Path(tmp)
    built, real_init = [], prefetch.GatherPrefetcher.__init__
    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    catch = Catch(logging.WARNING)
    logging.getLogger("qft_ds").addHandler(catch)
    out = {}
    try:
        for head, depth in RUNS:
            def init(self, _=None, depth=depth):  # ZeroSharding's depth is replaced by the run's
                real_init(self, depth)
                built.append(self)
            prefetch.GatherPrefetcher.__init__ = init
            warnings.clear()
            run = tmp / f"{head}-{depth}"
            T.train.main(T._argv(cfg, tmp / head, text, run, *EVAL))
            # after the last evaluation: every use of the run has been counted
            out[f"{head}-{depth}"] = {"stats": built[-1].stats(), "warnings": list(warnings)}
    finally:
        prefetch.GatherPrefetcher.__init__ = real_init
        logging.getLogger("qft_ds").removeHandler(catch)
    (tmp / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import WORDS, make_tiny_llama, make_word_tokenizer
    tmp = tmp_path_factory.mktemp("prefetch_train")
    text = T.write_model_and_corpus(tmp)  # tmp/model: a tied head
    (tmp / "model").rename(tmp / "tied")
    make_tiny_llama(vocab=len(WORDS) + 2, tie=False).save_pretrained(tmp / "untied")  # write_model_and_corpus's vocab
    make_word_tokenizer().save_pretrained(tmp / "untied")
    H.spawn(_worker, str(T._config(tmp, 2)), str(text), str(tmp))
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_evaluations_between_steps_never_miss_the_traced_order(runs, head):
    _, ranks = runs
    for rank in ranks:
        got = rank[f"{head}-2"]
        assert got["warnings"] == [] and got["stats"]["misses"] == 0
        # every evaluation after the first step restarted the trace, and the uses were prefetched
        assert got["stats"]["restarts"] > 0 and got["stats"]["prefetched"] > 0


def test_the_tied_run_has_the_bits_of_gathering_at_each_use(runs):
    tmp, ranks = runs
    assert all(r["tied-0"]["stats"]["prefetched"] == 0 for r in ranks)
    on, off = (T._summary(tmp / f"tied-{d}") for d in (2, 0))
    assert on["state_sha256"] == off["state_sha256"] and on["eval_end"] == off["eval_end"]
    rows_on, rows_off = T._rows(tmp / "tied-2"), T._rows(tmp / "tied-0")
    bits = ("loss", "grad_norm", "eval_loss")  # per step (no eval_loss at the last: eval_end is it)
    assert {s: [r.get(k) for k in bits] for s, r in rows_on.items()} == \
        {s: [r.get(k) for k in bits] for s, r in rows_off.items()}
    assert len({r["loss"] for r in rows_on.values()}) > 1
    assert all("eval_loss" in rows_on[s] for s in range(1, T.STEPS))
