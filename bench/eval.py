"""Benchmark `neva eval generate`'s engine against transformers' `generate` on the HF LLaVA export; prints ONE JSON line.

A random LLaMA (GQA) and a random CLIP (224 px, patch 14: 256 image tokens, as LLaVA's CLIP-224) are put
together with a random projector into a trained-model folder, which `neva export` writes as an HF LLaVA
folder. Both sides caption the same COCO-layout benchmark (its images drawn at 224 px) with Megatron's
captioning prompt, the same batches, greedy, stopping at EOS or --new tokens:

* ours: `neva_core.eval.generate.generate_predictions` (reads the benchmark, preprocesses, prompts through
  the model's template, decodes with the KV cache, writes and fsyncs the JSONL) with the model loaded once;
* transformers: `LlavaForConditionalGeneration.generate(do_sample=False)` on the export, the images read
  from the same benchmark, prompted through the export's processor and chat template, left padded.

The machine is shared and noisy: the two sides take turns within each of --repeats rounds and the medians
are reported (samples/s over --samples samples), with both sides' settings and whether their tokens agree.

    python bench/eval.py [--layers 6] [--hidden 1024] [--batch 4] [--samples 8] [--new 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neva_core.checkpoint.convert import convert_hf_checkpoint  # noqa: E402
from neva_core.eval.benchmarks import read_benchmark  # noqa: E402
from neva_core.eval.fixtures import make_coco_fixture  # noqa: E402
from neva_core.eval.generate import Answerer, generate_predictions  # noqa: E402
from neva_core.eval.predictions import read_predictions  # noqa: E402
from neva_core.eval.prompts import user_prompt  # noqa: E402
from neva_core.fixtures import make_fixtures  # noqa: E402
from neva_core.fixtures.models import write_tiny_clip, write_tiny_llama  # noqa: E402
from neva_core.llava import export_llava  # noqa: E402
from neva_core.model.projector import build_projector  # noqa: E402
from neva_core.model.trained import TrainedModelConfig, save_trained_model  # noqa: E402
from neva_core.tokenizer import extend_tokenizer  # noqa: E402

IMAGE_SIZE, PATCH = 224, 14
CLIP = dict(patch_size=PATCH, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
            projection_dim=384)


def build_model(root: Path, layers: int, hidden: int) -> Path:
    """A trained-model folder of random weights (vicuna_v1 template) at `root/model`."""
    fixtures = make_fixtures(root / "fixtures", images=4)
    tokenizer = extend_tokenizer(fixtures.tokenizer_model, root / "tokenizer")
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(fixtures.tokenizer_model)).vocab_size()
    llm = write_tiny_llama(root / "llm", vocab, seed=0, tokenizer_model=fixtures.tokenizer_model,
                           num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                           num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                           initializer_range=0.05)
    convert_hf_checkpoint(llm, root / "native", tokenizer=tokenizer.tokenizer_model, dtype="fp32")
    vision = write_tiny_clip(root / "clip", seed=1, image_size=IMAGE_SIZE, **CLIP)
    settings = TrainedModelConfig(family="llama", template="vicuna_v1", projector_type="mlp2x_gelu",
                                  image_size=IMAGE_SIZE, patch_size=PATCH,
                                  image_token_id=tokenizer.added["<extra_id_3>"])
    torch.manual_seed(2)
    return save_trained_model(root / "model", llm=root / "native", projector=build_projector(
        "mlp2x_gelu", CLIP["hidden_size"], hidden), vision_dir=vision, tokenizer_dir=tokenizer.out_dir,
        settings=settings)


class Transformers:
    """transformers' LLaVA on the export, fed the benchmark's images through the export's processor."""

    def __init__(self, export: Path, new: int) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(export).eval()
        self.processor = AutoProcessor.from_pretrained(export)
        self.processor.tokenizer.padding_side = "left"
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.unk_token
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": user_prompt("coco").split("\n", 1)[1]}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        self.new = new

    @torch.no_grad()
    def captions(self, data: Path, samples: int, batch: int) -> tuple[list[str], list[list[int]]]:
        """The decoded captions and the new tokens (cut at EOS) of the first `samples` images."""
        items = list(read_benchmark("coco", data))[:samples]
        out, token_rows = [], []
        eos = self.model.generation_config.eos_token_id
        for start in range(0, len(items), batch):
            group = items[start:start + batch]
            inputs = self.processor(images=[s.images[0] for s in group], text=[self.prompt] * len(group),
                                    return_tensors="pt", padding=True)
            tokens = self.model.generate(**inputs, max_new_tokens=self.new, do_sample=False,
                                         pad_token_id=self.processor.tokenizer.pad_token_id)
            new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
            token_rows += [row[:row.index(eos)] if eos in row else row for row in new_tokens.tolist()]
        return out, token_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="benchmark samples per timed pass")
    parser.add_argument("--new", type=int, default=24, help="most new tokens per caption")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of ours and transformers in turn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root, args.layers, args.hidden)
        export = export_llava(model, root / "llava")
        data = root / "coco"
        make_coco_fixture(data, samples=max(args.samples, 4), image_size=IMAGE_SIZE)
        ours, theirs = Answerer(model), Transformers(export, args.new)
        times: dict[str, list[float]] = {"neva_eval_generate": [], "transformers": []}
        results: dict[str, Any] = {}
        for round_ in range(args.repeats):
            pred = root / f"pred-{round_}.jsonl"
            start = time.perf_counter()
            generate_predictions(model, "coco", data, pred, batch=args.batch, limit=args.samples,
                                 max_new_tokens=args.new, answerer=ours)
            times["neva_eval_generate"].append(time.perf_counter() - start)
            results["neva_eval_generate"] = [r["caption"] for r in read_predictions(pred, "coco").records]
            start = time.perf_counter()
            _, tokens = theirs.captions(data, args.samples, args.batch)
            times["transformers"].append(time.perf_counter() - start)
            # compared through our decoder: both sides' token ids, not two detokenisers' treatment of bytes
            results["transformers"] = [ours.tokenizer.decode(row).strip() for row in tokens]
        params = sum(p.numel() for p in ours.model.parameters())
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "model": {"llm_layers": args.layers, "llm_hidden": args.hidden, "heads": 16, "kv_heads": 4,
                  "clip": {"image_size": IMAGE_SIZE, **CLIP}, "image_tokens": (IMAGE_SIZE // PATCH) ** 2,
                  "parameters": params, "dtype": "fp32", "weights": "random"},
        "task": "coco", "samples": args.samples, "batch": args.batch, "max_new_tokens": args.new,
        "threads": args.threads, "repeats": args.repeats, "device": "cpu",
        "ours": "neva_core.eval.generate.generate_predictions (KV cache, left padding, JSONL fsync per batch)",
        "theirs": "transformers LlavaForConditionalGeneration.generate(do_sample=False) on the neva export, "
                  "AutoProcessor with the export's chat template, left padding",
        "seconds_median": {k: round(v, 3) for k, v in median.items()},
        "seconds_all": {k: [round(v, 3) for v in values] for k, values in times.items()},
        "samples_per_s": {k: round(args.samples / v, 3) for k, v in median.items()},
        "speed_vs_transformers": round(median["transformers"] / median["neva_eval_generate"], 2),
        "same_tokens": results["neva_eval_generate"] == results["transformers"],
        "note": "shared, noisy machine: sides interleaved within each round, medians reported",
    }))


if __name__ == "__main__":
    main()
