"""COCO captioning scores equal to pycocoevalcap's COCOEvalCap on the same files, without its SPICE download.

What Megatron's evaluate_coco.py does, step by step: predictions lower-cased with trailing dots stripped,
the first per sample_id, only the images with a prediction scored (in the ground truth's image order), both
sides tokenised by pycocoevalcap's PTB tokenizer (Stanford CoreNLP in Java), then its Bleu(4), Rouge and
Cider (CIDEr-D, n=4, sigma=6, IDF from the scored images' references). COCOEvalCap.evaluate() also runs
METEOR and SPICE, which need Java downloads at first use; the three scorers here are called directly.
The two sides are tokenised in one Java run instead of two: the tokenizer works line by line
(-preserveLines), so the tokens are the same.
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError
from neva_core.eval.predictions import Predictions, expect_type, read_predictions
from neva_core.io import read_json

_GT, _PRED = "gt", "pred"
PTB_TOKENIZER = "pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, Java)"
_PLAIN_PUNCTUATION = ".,!?;:"  # among the tokens pycocoevalcap's tokenizer drops


@dataclass(frozen=True)
class GroundTruth:
    image_ids: list[int]  # in file order, as pycocotools indexes them
    references: dict[int, list[str]]  # reference captions per image, in file order
    file_names: dict[int, str]  # only the images whose entry names its file


def load_ground_truth(path: Path) -> GroundTruth:
    """A COCO-format caption file: {"images": [{"id", "file_name"?}], "annotations": [{"image_id", "caption"}]}."""
    path = Path(path)
    data = read_json(path, f"ground-truth file {path} does not exist (coco_karpathy_test_gt.json, COCO format)")
    try:
        images = {image["id"]: image.get("file_name") for image in data["images"]}
        references: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            references.setdefault(annotation["image_id"], []).append(str(annotation["caption"]))
    except (KeyError, TypeError) as exc:
        raise NevaError(f"{path} is not in COCO caption format ({exc!r} missing): it needs 'images' with 'id' and "
                        "'annotations' with 'image_id' and 'caption'") from None
    return GroundTruth(image_ids=list(images), references=references,
                       file_names={i: name for i, name in images.items() if name})


def clean_caption(caption: str) -> str:
    """Megatron's post-processing of a generated caption: trailing dots stripped, then lower-cased."""
    return caption.rstrip(".").lower()


def score_coco(pred_path: Path, gt_path: Path) -> dict[str, Any]:
    """`neva eval score --task coco`: CIDEr, BLEU-1..4 and ROUGE-L (x100) of the predicted images."""
    predictions = read_predictions(pred_path, "coco")
    truth = load_ground_truth(gt_path)
    references = truth.references
    captions = _predicted_captions(predictions, set(truth.image_ids), gt_path)
    scored = [image_id for image_id in truth.image_ids if image_id in captions]
    for image_id in scored:
        if not references.get(image_id):
            raise NevaError(f"{gt_path}: image {image_id} has no reference caption; it cannot be scored")
    return {"task": "coco", **score_captions({i: captions[i] for i in scored}, {i: references[i] for i in scored}),
            "images_scored": len(scored), "duplicates_ignored": predictions.duplicates_ignored,
            "tokenizer": PTB_TOKENIZER}


def score_captions(captions: Mapping[Hashable, str], references: Mapping[Hashable, list[str]],
                   tokenizer: str = "ptb") -> dict[str, float]:
    """CIDEr, BLEU-1..4 and ROUGE-L (x100) of cleaned captions (already `clean_caption`ed) against their
    images' references, as COCOEvalCap computes them; both mappings are keyed by image.

    tokenizer "ptb": pycocoevalcap's PTB tokenizer (Java); "plain": `plain_tokens`, which needs no Java and
    gives the PTB tokenizer's tokens on captions of words, spaces and the punctuation it drops.
    """
    if set(captions) != set(references) or not captions:
        raise NevaError(f"captions for {len(captions)} images and references for {len(references)} images: "
                        "give both for the same, non-empty set of images")
    if not all(references[i] for i in captions):
        raise NevaError("every image needs at least one reference caption to be scored")
    gts = {i: list(references[i]) for i in captions}
    res = {i: [captions[i]] for i in captions}
    if tokenizer == "ptb":
        gts, res = _tokenize(gts, res)
    elif tokenizer == "plain":
        gts, res = ({i: [plain_tokens(c) for c in side[i]] for i in side} for side in (gts, res))
    else:
        raise NevaError(f"unknown caption tokenizer {tokenizer!r}; choose 'ptb' or 'plain'")
    return _corpus_scores(gts, res)


def plain_tokens(caption: str) -> str:
    """The PTB tokenizer's output (lower-cased tokens, its dropped punctuation gone) for captions made of
    words, spaces and , . ! ? ; : -- not for contractions, brackets or quotes, which it splits or renames."""
    words = (word.strip(_PLAIN_PUNCTUATION) for word in caption.lower().split())
    return " ".join(word for word in words if word)


def _predicted_captions(predictions: Predictions, known: set[int], gt_path: Path) -> dict[int, str]:
    captions = {}
    for record in predictions.records:
        sample_id = record["sample_id"]
        if not isinstance(sample_id, int) or sample_id not in known:
            raise NevaError(
                f"{predictions.path}: sample_id {sample_id!r} is not an image id of {gt_path}; COCO predictions "
                "are keyed by the ground truth's integer image ids"
            )
        captions[sample_id] = clean_caption(expect_type(predictions.path, sample_id, "caption", record["caption"], str))
    return captions


def _tokenize(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> tuple[dict, dict]:
    """Both sides through pycocoevalcap's PTB tokenizer in one Java run."""
    if shutil.which("java") is None:
        raise NevaError(
            "COCO scoring needs Java for pycocoevalcap's PTB tokenizer, and `java` is not on PATH: install a "
            "JRE (e.g. `apt-get install openjdk-17-jre-headless`) and try again"
        )
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    combined = {(side, image_id): [{"caption": c} for c in captions]
                for side, table in ((_GT, gts), (_PRED, res)) for image_id, captions in table.items()}
    try:
        tokens = PTBTokenizer().tokenize(combined)
    except OSError as exc:  # it writes its input file beside its jar, inside the installed package
        raise NevaError(f"pycocoevalcap's PTB tokenizer failed to run ({exc}); it needs write access to the "
                        "pycocoevalcap/tokenizer folder of the environment") from exc
    for key, captions in combined.items():
        if len(tokens.get(key, ())) != len(captions):
            raise NevaError(
                f"the PTB tokenizer returned {len(tokens.get(key, ()))} lines for {len(captions)} captions of "
                f"image {key[1]}; a caption probably holds a line break the tokenizer splits on"
            )
    return ({i: tokens[(_GT, i)] for i in gts}, {i: tokens[(_PRED, i)] for i in res})


def _corpus_scores(gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"CIDEr": 100 * float(cider), **{f"BLEU-{n}": 100 * float(b) for n, b in enumerate(bleu, start=1)},
            "ROUGE-L": 100 * float(rouge)}
