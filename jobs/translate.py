"""Translation with memory (shared/docs/translation-task.md): the GNMT-style model with the
memory of the paper's Figure 2 against the same model without, trained on the same data.

    python -m jobs.translate                          # multi30k preset (En->De), embedded local Ray
    python -m jobs.translate --preset quick           # a smoke run (CI)
    python -m jobs.translate --preset wmt14-sample    # the WMT path end to end on the 10k sample
    python -m jobs.translate --preset wmt14 --train europarl.en,europarl.de,cc.en,cc.de   # a GPU cluster
    python -m jobs.translate --resume runs/translate-...   # continue from the latest checkpoints

Prepares the training corpora (reused when prepared before), trains both variants with Ray
Train (data-parallel trainers fed by Ray Data; the memory variant's trainers share one life-long
`ShardedMemory`), then on each test set: sacreBLEU (beam search) for both, the context protocol
(C / E halves) and rare-word one-shot recall. Prints a table; writes metrics.json and bleu.png
(dev BLEU over training, both variants) into the run folder.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from distmem import LocalMemory
from distmem.cli import follow, open_run, parse_run_config, user_errors
from distmem.models.seq2seq import Seq2Seq
from distmem.plots import line_plot
from distmem.runs import RunStore
from distmem.tasks.translation import DataError, prepare
from distmem.tasks.translation.config import PRESETS, TranslationRunConfig
from distmem.tasks.translation.evaluation import bleu, context_split, recall, recall_words, word_counts
from distmem.tasks.translation.prepare import read_lines
from distmem.tasks.translation.task import TranslationTask
from distmem.tasks.translation.training import Translator, load_run

VARIANTS = {"memory": True, "baseline": False}  # sub-folder -> use_memory


def plot_bleu(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    with line_plot(path, title, "training step", "dev BLEU (greedy)") as ax:
        for variant, style in (("memory", "o-"), ("baseline", "s--")):
            points = curves.get(variant, [])
            ax.plot([p["step"] for p in points], [p["dev_bleu"] for p in points], style,
                    label=f"{'with' if variant == 'memory' else 'without'} memory")


def evaluate_test_set(cfg: TranslationRunConfig, models: dict[str, Seq2Seq], memories: dict[str, LocalMemory],
                      spm_model: str, train_counts, src: list[str], ref: list[str]) -> dict:
    """BLEU of both variants on the whole set; the context protocol and word recall on its halves."""
    c, e = context_split(len(src))
    words = recall_words(train_counts, ref[c])
    out: dict = {"sentences": len(src), "context": c.stop - c.start, "evaluation": e.stop - e.start,
                 "new_word_types": len(words.new), "rare_word_types": len(words.rare)}

    def translator(variant: str, memory: LocalMemory | None) -> Translator:
        return Translator(models[variant], spm_model, memory, beam=cfg.beam, length_penalty=cfg.length_penalty)

    def trained_memory() -> LocalMemory:  # a fresh copy of the memory as training left it
        memory = LocalMemory(cfg.memory_config(), backend=cfg.backend)
        memory.load_state(memories["memory"].state())
        return memory

    def scores(hyps: list[str]) -> dict:
        return {"bleu_e": bleu(hyps, ref[e]), "new_words": recall(hyps, ref[e], words.new),
                "rare_words": recall(hyps, ref[e], words.rare)}

    baseline = translator("baseline", None).translate(src)
    out["baseline"] = {"bleu": bleu(baseline, ref), **scores(baseline[e])}
    full = translator("memory", trained_memory()).translate(src)
    out["memory"] = {"bleu": bleu(full, ref)}
    out["memory"]["no_context"] = scores(translator("memory", trained_memory()).translate(src[e]))
    with_context = translator("memory", trained_memory())
    with_context.remember(src[c], ref[c])
    out["memory"]["context"] = scores(with_context.translate(src[e]))
    return out


def training_word_counts(prepared) -> dict:
    """Word counts of the training targets (decoded from the prepared pieces), for new / rare words."""
    import pyarrow.parquet as pq
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(prepared.spm_model))

    def targets():
        for file in prepared.files:
            for batch in pq.ParquetFile(file).iter_batches(columns=["tgt"]):
                yield from sp.decode(batch.column("tgt").to_pylist())

    return word_counts(targets())


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_run_config(TranslationRunConfig, PRESETS, __doc__, argv)
    with user_errors(DataError):
        return run(cfg, args)


def run(cfg: TranslationRunConfig, args) -> dict:
    started = time.time()
    for corpus in [*cfg.train_corpora(), *[(t.src, t.ref) for t in [cfg.dev_set(), *cfg.test_sets()]]]:
        for path in corpus:
            if "://" not in path and not Path(path).is_file():
                raise FileNotFoundError(f"--data: no {path} (expected the shared data folder, see its README)")
    store = open_run(cfg, args, name=f"translate-{cfg.preset}")
    print(f"preparing {cfg.train_corpora()} -> {cfg.prepared}/{cfg.prepared_name()}", flush=True)
    prepared = prepare(cfg.train_corpora(), Path(cfg.prepared) / cfg.prepared_name(), cfg.prepare_settings())
    print(f"prepared data: {prepared.root} ({'reused' if prepared.reused else 'new'}; {prepared.counts})", flush=True)
    store.upload(prepared.spm_model, "spm.model")  # the run's tokeniser travels with its checkpoints

    from distmem.distributed import connect, fit  # imports Ray
    connect(args.address)  # in the main thread: an embedded Ray lives as long as the thread that starts it

    def train(sub: RunStore, use_memory: bool) -> None:
        memory = fit(TranslationTask(cfg, prepared, use_memory), sub, args.address, args.memory_storage,
                     args.max_failures)
        if memory is not None:  # saved with every checkpoint; the evaluation reads the last one
            memory.shutdown()

    trained: dict[str, dict] = {}
    models: dict[str, Seq2Seq] = {}
    memories: dict[str, LocalMemory] = {}
    for variant, use_memory in VARIANTS.items():
        sub = RunStore(store.location(variant))
        follow(sub, cfg.steps, f"training {'with' if use_memory else 'without'} memory",
               lambda sub=sub, use_memory=use_memory: train(sub, use_memory),
               postfix=lambda s: {"ce": f"{s['ce']:.2f}", "acc": f"{s['accuracy']:.3f}"})
        models[variant], memory, trained[variant] = load_run(store.uri, variant)
        if memory is not None:
            memories[variant] = memory
    train_seconds = time.time() - started

    train_counts = training_word_counts(prepared)
    results = {}
    for test in cfg.test_sets():
        print(f"evaluating on {test.name} ...", flush=True)
        src, ref = list(read_lines(test.src)), list(read_lines(test.ref))
        if cfg.test_sentences:
            src, ref = src[: cfg.test_sentences], ref[: cfg.test_sentences]
        results[test.name] = evaluate_test_set(cfg, models, memories, str(prepared.spm_model), train_counts, src, ref)

    metrics = {"preset": cfg.preset, "config": vars(cfg), "prepared": {"root": str(prepared.root),
                                                                      "counts": prepared.counts},
               "results": results, "wall_seconds": time.time() - started, "train_seconds": train_seconds,
               "curves": {v: t["curve"] for v, t in trained.items()},
               "dev_bleu": {v: t["evals"] for v, t in trained.items()}}
    store.write_text("metrics.json", json.dumps(metrics, indent=1, default=list))
    with tempfile.TemporaryDirectory() as tmp:
        plot_bleu(metrics["dev_bleu"], Path(tmp) / "bleu.png", f"Translation, {cfg.preset} preset: dev BLEU")
        store.upload(Path(tmp) / "bleu.png", "bleu.png")
    print_table(results)
    print(f"\nwall time {metrics['wall_seconds']:.0f} s (training {train_seconds:.0f} s); metrics.json and bleu.png "
          f"in {store.uri}")
    return metrics


def print_table(results: dict) -> None:
    for name, r in results.items():
        m, b = r["memory"], r["baseline"]
        print(f"\n{name}: {r['sentences']} sentences (context C {r['context']}, evaluation E {r['evaluation']}); "
              f"{r['new_word_types']} new and {r['rare_word_types']} rare word types shown by C")
        print(f"  BLEU (beam)           with memory {m['bleu']['bleu']:5.1f}   without {b['bleu']['bleu']:5.1f}   "
              f"[{m['bleu']['signature']}]")
        rows = [("E, no context (a)", m["no_context"]), ("E, context (b)", m["context"]), ("E, baseline", b)]
        for label, s in rows:
            new, rare = s["new_words"], s["rare_words"]
            print(f"  {label:<20} BLEU {s['bleu_e']['bleu']:5.1f}   new words {new['recalled']}/{new['occurrences']}"
                  f" = {new['recall']:5.1f}% [{new['ci95'][0]:.1f}, {new['ci95'][1]:.1f}]   rare words "
                  f"{rare['recalled']}/{rare['occurrences']} = {rare['recall']:5.1f}%")


if __name__ == "__main__":
    main()
