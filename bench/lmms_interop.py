"""Interop check: lmms-eval's `llava_hf` model on our HF LLaVA export captions the COCO fixture as we do.

A trained-model folder is built from the fixtures (fixture LLM and CLIP, random projector), exported with
`neva export` (neva_core.llava.export_llava) and run two ways over the same COCO-layout fixture:

* ours: `neva eval generate --task coco` (neva_core.eval.generate.generate_predictions);
* lmms-eval 0.7.3 in its own venv: `--model llava_hf --model_args pretrained=EXPORT,device_map=cpu` on a
  local task YAML (written here) whose dataset is the fixture saved with `datasets.save_to_disk`
  (`dataset_kwargs: {load_from_disk: true}`), `--log_samples`.

lmms-eval exits 0 even when every request failed, so its exit code is not trusted: the verdict comes from
its samples file, whose captions must equal ours sample by sample, and the captions must differ between
images (else the image might not have been seen). Prints ONE JSON line; exits 1 otherwise.

The venv (outside the project; it reuses our torch and transformers through a .pth file). lmms-eval needs
decord and filelock<4 (4.x lacks filelock._api: lmms-eval then fails every task and still exits 0); it pulls
torchvision, whose PyPI wheel is built for the CUDA torch and breaks `import transformers` beside our CPU torch
("operator torchvision::nms does not exist"), so it is removed again (llava_hf does not use it):
    python3.11 -m venv /tmp/lmms-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/lmms-venv/lib/python3.11/site-packages/neva.pth
    echo "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" > /tmp/c.txt
    /tmp/lmms-venv/bin/pip install lmms-eval==0.7.3 decord "filelock<4" torchvision==0.28.0 -c /tmp/c.txt
    /tmp/lmms-venv/bin/pip uninstall -y torchvision
Run:
    .venv/bin/python bench/lmms_interop.py --lmms-venv /tmp/lmms-venv [--samples 6] [--new 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neva_core.checkpoint.convert import convert_hf_checkpoint  # noqa: E402
from neva_core.eval.benchmarks import read_benchmark  # noqa: E402
from neva_core.eval.fixtures import make_coco_fixture  # noqa: E402
from neva_core.eval.generate import generate_predictions  # noqa: E402
from neva_core.eval.predictions import read_predictions  # noqa: E402
from neva_core.eval.prompts import user_prompt  # noqa: E402
from neva_core.fixtures import make_fixtures  # noqa: E402
from neva_core.fixtures.models import write_tiny_llama  # noqa: E402
from neva_core.llava import export_llava  # noqa: E402
from neva_core.model.projector import build_projector  # noqa: E402
from neva_core.model.trained import TrainedModelConfig, save_trained_model  # noqa: E402
from neva_core.tokenizer import extend_tokenizer  # noqa: E402

TASK = "neva_coco_fixture"
# The task's hooks, loaded by lmms-eval from the task folder (`!function neva_task.…`).
TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return {question!r}


def process_results(doc, results):
    return {{"answered": float(bool(results[0].strip()))}}
'''
TASK_YAML = """task: {task}
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function neva_task.doc_to_visual
doc_to_text: !function neva_task.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {new}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function neva_task.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def build_export(root: Path) -> tuple[Path, Path]:
    """(trained-model folder, its HF LLaVA export) from the fixtures' tokenizer and CLIP, a random LLaMA and a
    random projector.

    The LLM's output rows of byte-fallback, control and added tokens are zeroed, so it only ever emits
    ordinary pieces (a zero logit never beats the best of hundreds of random ones): both sides' captions
    are then plain text, and sentencepiece's and `tokenizers`' different renderings of invalid UTF-8 byte
    runs cannot decide the comparison.
    """
    import sentencepiece
    import torch
    from safetensors.torch import load_file, save_file

    fixtures = make_fixtures(root / "fixtures", images=4)
    tokenizer = extend_tokenizer(fixtures.tokenizer_model, root / "tokenizer")
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.tokenizer_model))
    llm = write_tiny_llama(root / "llm", pieces.vocab_size(), seed=3, tokenizer_model=tokenizer.tokenizer_model,
                           initializer_range=0.3)  # large enough that the image changes the caption
    weights_file = llm / "model.safetensors"
    weights = load_file(weights_file)
    silent = [i for i in range(pieces.vocab_size())
              if pieces.is_byte(i) or pieces.is_control(i) or pieces.is_unknown(i) or pieces.is_unused(i)
              or i in tokenizer.added.values()]
    weights["lm_head.weight"][silent] = 0.0
    save_file(weights, weights_file, metadata={"format": "pt"})
    convert_hf_checkpoint(llm, root / "native", tokenizer=tokenizer.tokenizer_model, dtype="fp32")
    settings = TrainedModelConfig(family="llama", template="vicuna_v1", projector_type="mlp2x_gelu", image_size=64,
                                  patch_size=16, image_token_id=tokenizer.added["<extra_id_3>"])
    torch.manual_seed(7)
    model = save_trained_model(root / "model", llm=root / "native", projector=build_projector("mlp2x_gelu", 64, 64),
                               vision_dir=fixtures.vision_dir, tokenizer_dir=tokenizer.out_dir, settings=settings)
    return model, export_llava(model, root / "llava")


def write_task(root: Path, data: Path, new: int) -> Path:
    """The fixture as a save_to_disk dataset (split `test`) and the task folder for --include_path."""
    import datasets

    rows = [{"image_id": s.sample_id, "image": s.images[0], "answer": s.references}
            for s in read_benchmark("coco", data)]
    features = datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image(),
                                  "answer": datasets.Sequence(datasets.Value("string"))})
    dataset = root / "hf-coco"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=features)}).save_to_disk(str(dataset))
    tasks = root / "tasks"
    tasks.mkdir()
    question = user_prompt("coco").split("\n", 1)[1]  # llava_hf puts "<image>\n" in front itself
    (tasks / "neva_task.py").write_text(TASK_UTILS.format(question=question))
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, dataset=dataset, new=new))
    return tasks


def run_lmms(venv: Path, export: Path, tasks: Path, out: Path, limit: int) -> tuple[int, str]:
    command = [str(venv / "bin" / "python"), "-m", "lmms_eval", "--model", "llava_hf",
               "--model_args", f"pretrained={export},device_map=cpu,device=cpu,dtype=float32",
               "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "1", "--limit", str(limit),
               "--log_samples", "--output_path", str(out)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="disabled", OMP_NUM_THREADS="2")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    return done.returncode, (done.stdout + done.stderr)[-3000:]


def lmms_captions(out: Path, image_ids: list[int]) -> dict[int, str]:
    """image_id -> caption from lmms-eval's samples file(s) (*_samples_<task>.jsonl; doc_id is the row)."""
    captions = {}
    for path in sorted(out.rglob(f"*samples_{TASK}*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                response = record.get("filtered_resps") or record.get("resps")
                while isinstance(response, list):
                    response = response[0] if response else ""
                captions[image_ids[int(record["doc_id"])]] = str(response).strip()
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lmms-venv", type=Path, default=Path("/tmp/lmms-venv"))
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--new", type=int, default=8, help="most new tokens per caption")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="work in DIR (a new folder) and keep it, lmms-eval's output included")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        model, export = build_export(root)
        data = root / "coco"
        make_coco_fixture(data, samples=args.samples)
        pred = root / "ours.jsonl"
        generate_predictions(model, "coco", data, pred, batch=args.samples, max_new_tokens=args.new)
        ours = {r["sample_id"]: r["caption"] for r in read_predictions(pred, "coco").records}
        code, tail = run_lmms(args.lmms_venv, export, write_task(root, data, args.new), root / "lmms", args.samples)
        theirs = lmms_captions(root / "lmms", list(ours))
    mismatches = {i: {"neva": ours[i], "lmms_eval": theirs.get(i)} for i in ours if theirs.get(i) != ours[i]}
    distinct = len(set(ours.values()))  # one caption for every image would not show the image was seen
    verdict = bool(theirs) and not mismatches and distinct > 1
    print(json.dumps({
        "lmms_eval": "0.7.3 llava_hf", "samples": len(ours), "lmms_samples": len(theirs),
        "lmms_exit_code": code, "same_captions": bool(theirs) and not mismatches, "distinct_captions": distinct, "passed": verdict,
        "mismatches": mismatches,
        "captions": list(ours.values()), **({} if verdict else {"lmms_output_tail": tail}),
    }))
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
